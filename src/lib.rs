pub mod config;
pub mod turn;
