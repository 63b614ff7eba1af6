//! Runs the unit tests at the end of `examples/counter.rs`: the template's service tested
//! without a socket. (`test = true` on the example would run them too, but then `cargo test`
//! builds the example only as a test harness, not the binary the other tests start.)

#[allow(dead_code)]
#[path = "../examples/counter.rs"]
mod counter;
