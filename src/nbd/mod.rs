//! The NBD wire protocol, shared by the NBD export (`export::nbd`, the
//! server side) and the `nbd` driver (`drivers::nbd`, the client side):
//! the protocol's numbers and the encoders and decoders of its messages
//! (handshake options and their replies, request headers, simple and
//! structured reply headers).
//!
//! Pure byte layout: no sockets, no runtime, nothing from the graph, so
//! both sides (layers 5 and 7) can use it from layer 1. What each side
//! does with a message (which options it haggles, how it bounds what a
//! peer may make it allocate) stays with that side.

// Each side uses the constants it needs; with only one side built, the
// others would be reported as unused.
#[cfg_attr(
    not(all(feature = "nbd-export", feature = "nbd-client")),
    allow(dead_code)
)]
pub(crate) mod proto;
