//! tower layers
