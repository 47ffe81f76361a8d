//! The integration tests, one test binary (each file was once a binary of its own; one link
//! instead of sixteen). Every module talks to the real RabbitMQ on 127.0.0.1:5672 through a
//! gateway started in-process by `common`. One module alone:
//! `cargo nextest run --features test-switches --test integration session_attacks::`.

mod common;

mod admin;
mod backend_faults;
mod backend_tls;
mod exchange_types;
mod gateway_lapin;
mod issuers_policy;
mod jwks;
mod limits;
mod no_lost_messages;
mod protocol_abuse;
mod proxy_protocol;
mod session_attacks;
#[cfg(feature = "sts-emulator")]
mod sts_emulator;
mod token_attacks;
mod token_cache;
mod token_lifecycle;
