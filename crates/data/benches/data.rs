//! The data layer's benchmarks (filled in with the router).

fn main() {}
