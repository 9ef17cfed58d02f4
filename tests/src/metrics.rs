//! Reading a replica daemon's `/metrics` page (Prometheus text format).
//!
//! The daemons serve plain HTTP/1.1 with `Connection: close`, so one request on a
//! fresh TCP connection, read to the end, is all a test needs. [`Metrics`] keeps the
//! samples (name, labels, value) and answers look-ups by name and label subset.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// One sample line: `name{label="value",...} number`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with any `_total` / `_bucket` suffix as written).
    pub name: String,
    /// Labels, sorted by key.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Every sample, in page order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the Prometheus text format; comment lines and lines that do not parse
    /// are skipped (a test asserts on the samples it needs, not on the page's shape).
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Metrics { samples }
    }

    /// Samples whose name is `name` and whose labels include every pair of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|got| got == v))
        })
    }

    /// The value of the only sample matching [`Metrics::find`], if exactly one does.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.find(name, labels);
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }

    /// The value of counter `name` with `labels` (exposed as `<name>_total`; a gauge of
    /// that name also counts), as a whole number.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        self.value(&format!("{name}_total"), labels)
            .or_else(|| self.value(name, labels))
            .map(|v| v as u64)
    }

    /// Names of all samples containing `part`, deduplicated and sorted (for error
    /// messages that say what the page offered instead).
    pub fn names_containing(&self, part: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name.contains(part))
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Parses one sample line; `None` when it is not one.
fn parse_sample(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line[open..].rfind('}')? + open;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"` (escaped quotes and backslashes allowed in values).
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_owned(), value);
    }
}

/// GETs `/metrics` from `addr` and parses it.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, get(addr, "/metrics"))
        .await
        .map_err(|_| anyhow!("GET http://{addr}/metrics took longer than {SCRAPE_TIMEOUT:?}"))??;
    Ok(Metrics::parse(&body))
}

/// One HTTP/1.1 GET with `Connection: close`; returns the body of a 200 answer.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .with_context(|| format!("sending GET {path} to {addr}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .with_context(|| format!("reading the answer to GET {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path} from {addr}: no HTTP header in the answer"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "GET {path} from {addr} answered {status:?}"
    );
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_and_without_labels() {
        let page = "# HELP x help\n# TYPE x counter\nx_total 3\n\
                    y{volume=\"tv-1\",class=\"fg\"} 4.5 1700000000\n\
                    z{a=\"q\\\"uote\"} +Inf\nnot a sample\n";
        let m = Metrics::parse(page);
        assert_eq!(m.value("x_total", &[]), Some(3.0));
        assert_eq!(m.value("y", &[("volume", "tv-1")]), Some(4.5));
        assert_eq!(m.value("y", &[("volume", "tv-2")]), None);
        assert_eq!(m.value("z", &[("a", "q\"uote")]), Some(f64::INFINITY));
        assert_eq!(m.names_containing("_"), vec!["x_total".to_owned()]);
    }
}
