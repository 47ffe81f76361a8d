//! Authorisation: the permission table built from a token's scopes
//! ([`permissions`]) and the pure per-method decision ([`decide()`]).
//!
//! Invariant: no IO, no clock, no logging. The proxy asks, this module answers; the call
//! site logs the decision and counts it.

pub mod decide;
pub mod iam;
pub mod permissions;
pub mod wildcard;

pub use decide::{
    Context, Denial, ExchangeKind, Operation, REPLY_TO, Trace, Verdict, connect, decide,
    decide_traced, reply_text, strip_cr_lf,
};
pub use permissions::{Grant, Perm, Permissions};

#[cfg(test)]
mod tests;
