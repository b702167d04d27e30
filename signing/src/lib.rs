/*! Keys, trust policy and the signed bundle format. Depends on no other crate of the project. */
