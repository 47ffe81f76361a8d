//! Session tests: frames in, frames out.
