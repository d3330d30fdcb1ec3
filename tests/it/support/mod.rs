//! Helpers only some test modules need (and the crates they bring): JSON Schema checks and
//! the generated turn fields shared by the fuzzing and the schema tests.

pub mod schemas;
pub mod turns;
