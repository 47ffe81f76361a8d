//! Sans-IO AMQP 0-9-1: framing, the methods the gateway inspects, reply codes, and the
//! client-side handshake state machine.
//!
//! **Invariant:** nothing in this module does IO or reads a clock; bytes and decisions
//! are passed in and out.

pub mod frame;
pub mod handshake;
pub mod method;
pub mod session;
pub mod table;
