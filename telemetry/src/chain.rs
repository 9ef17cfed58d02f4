//! An error with its causes on one line.

/// An error and its sources as one line (`outer: cause: root cause`), for status
/// messages, wire error messages and logs. The one such helper of every Tessera crate.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening the store")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_every_cause() {
        let e = Outer(std::io::Error::other("disk gone"));
        assert_eq!(error_chain(&e), "opening the store: disk gone");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }
}
