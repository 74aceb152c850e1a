pub mod api;
pub mod manifest;
