//! One module per noun of the CLI; each parses its arguments and calls a library.
