//! What the gateway tells its operators, a leaf module every other can use: the Prometheus
//! metrics (`metrics`) and the audit log (`audit`).

pub mod audit;
pub mod metrics;
