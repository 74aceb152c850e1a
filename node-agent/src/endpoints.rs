//! The built-in endpoints controller (standalone): EndpointSlices from the local pods a Service selects.
