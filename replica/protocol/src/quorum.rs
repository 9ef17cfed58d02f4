//! The quorum every process counts the same way: a write, a record change or a copy
//! is decided by a majority of the volume's whole replica set, never of the replicas
//! that happen to answer.

/// Smallest number of replicas that is a majority of `replicas` (at least one).
pub fn majority(replicas: usize) -> usize {
    replicas / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majorities() {
        let got: Vec<usize> = (0..=7).map(majority).collect();
        assert_eq!(got, [1, 1, 2, 2, 3, 3, 4, 4]);
    }
}
