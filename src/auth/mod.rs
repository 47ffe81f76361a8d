pub mod wildcard;
pub mod scopes;
