//! wildcard
