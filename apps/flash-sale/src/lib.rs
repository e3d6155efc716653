//! The flash-sale service's parts. So far: the stock gate, where a purchase
//! attempt takes a unit of stock as a reservation, atomically and in one step
//! (sale window, sold out, per-user limit, stock, the reservation and its expiry),
//! in Redis for a distributed sale or in process for the embedded one. A
//! reservation then becomes an order or is released; whichever happens first wins,
//! so stock cannot be both ordered and returned. And the two services' databases
//! (inventory and orders), each write keyed by the reservation and each guarding
//! the invariants on its own; and the saga that turns a reservation into an order
//! across them, cancelling an order not paid in time.

pub mod gate;
pub mod naive;
pub mod order;
pub mod run;
pub mod service;
pub mod store;
pub mod upkeep;

pub use gate::{Gate, GateError, Reserve, Sale, StockCount};
pub use store::{Inventory, NewOrder, OrderState, Orders, Placed, Taken};
