//! The Tessera CSI node plugin (filled by the data-path work).
