//! The Tessera CSI controller.
