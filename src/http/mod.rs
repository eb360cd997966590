//! The HTTP edge: the router, the middleware stack, the error type and the extractors.

pub mod error;
pub mod extract;
pub mod middleware;
pub mod router;
