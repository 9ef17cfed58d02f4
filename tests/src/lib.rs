//! Harness for tests that start real Tessera processes.
