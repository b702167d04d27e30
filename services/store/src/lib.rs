/*! The model store and the verified import path: the only code that writes the store. */
