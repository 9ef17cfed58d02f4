//! The teardown of `tessera up`: undo the demo through CSI, stop the daemons newest
//! first, and check that nothing stays mounted or attached under the directory.
//!
//! It runs whatever happened before (success, failed step, Ctrl-C) and never stops
//! at the first error: each step is reported, and a summary says whether all of it
//! was clean, which decides the exit code.

use std::os::unix::process::ExitStatusExt;

use crate::daemon::{Stopped, LOG_TAIL_LINES};
use crate::demo::{self, DemoSetup, Progress};
use crate::layout::Layout;
use crate::leftovers;
use crate::local_cluster::LocalCluster;
use crate::up::indent;

/// Undoes the demo, stops the daemons and checks the directory. Returns whether all
/// of it went cleanly; prints each step.
pub async fn teardown(
    cluster: &mut LocalCluster,
    layout: &Layout,
    setup: &DemoSetup,
    progress: &Progress,
    keep_volumes: bool,
) -> Summary {
    let mut summary = Summary::default();
    let node_results = demo::undo_node(setup, progress).await;
    let node_failed = node_results.iter().any(|(_, r)| r.is_err());
    report_undo(cluster, &mut summary, node_results);
    if node_failed {
        // Do what the node plugin could not while the engine-host still serves the
        // volume, so the filesystem is flushed and the controller steps find it idle.
        match leftovers::unmount_filesystems(layout) {
            Ok(found) if !found.mounts.is_empty() => {
                println!(
                    "  unmounted the volume directly instead:\n{}",
                    indent(&indent(&found.describe()))
                );
            }
            Ok(_) => {}
            Err(e) => println!("  unmounting directly failed too: {e:#}"),
        }
    }
    let controller_results = demo::undo_controller(setup, progress, !keep_volumes).await;
    report_undo(cluster, &mut summary, controller_results);
    if keep_volumes {
        if let Some(id) = &progress.volume_id {
            summary.kept_volume = Some(id.clone());
            println!(
                "  kept volume {id} (--keep-volumes); replica data stays in {}",
                layout.root.display()
            );
        }
    }
    for stopped in cluster.stop_all().await {
        if report_stop(&stopped) {
            summary.stopped += 1;
        } else {
            summary.stopped_badly += 1;
        }
    }
    match leftovers::scan(layout) {
        Ok(remains) if remains.is_empty() => {
            summary.no_leftovers = true;
            println!(
                "  no mounts or loop devices left under {}",
                layout.root.display()
            );
        }
        Ok(remains) => {
            println!(
                "  LEFT BEHIND under {}:\n{}",
                layout.root.display(),
                indent(&indent(&remains.describe()))
            );
            match leftovers::unmount_all(layout).and_then(|_| leftovers::scan(layout)) {
                Ok(after) if after.is_empty() => println!("  removed them"),
                Ok(after) => println!(
                    "  could not remove:\n{}",
                    indent(&indent(&after.describe()))
                ),
                Err(e) => println!("  removing them failed: {e:#}"),
            }
        }
        Err(e) => println!("  checking for leftovers failed: {e:#}"),
    }
    let _ = std::fs::remove_file(layout.endpoints_file());
    summary
}

/// What the teardown did, for the final summary line.
#[derive(Debug, Default)]
pub struct Summary {
    /// CSI undo calls that succeeded.
    undone: usize,
    /// CSI undo calls that failed.
    undo_failed: usize,
    /// Volume left in place because of `--keep-volumes`.
    kept_volume: Option<String>,
    /// Daemons that exited 0 after SIGTERM.
    stopped: usize,
    /// Daemons that crashed earlier, failed on exit or had to be killed.
    stopped_badly: usize,
    /// Whether the directory had no mounts or loop devices after the stop.
    no_leftovers: bool,
}

impl Summary {
    pub fn clean(&self) -> bool {
        self.undo_failed == 0 && self.stopped_badly == 0 && self.no_leftovers
    }

    pub fn line(&self) -> String {
        let mut parts = vec![format!(
            "{} CSI undo step(s) ok, {} failed",
            self.undone, self.undo_failed
        )];
        if let Some(id) = &self.kept_volume {
            parts.push(format!("volume {id} kept"));
        }
        parts.push(format!(
            "{} daemon(s) stopped cleanly, {} not",
            self.stopped, self.stopped_badly
        ));
        parts.push(if self.no_leftovers {
            "no mounts or loop devices left".to_owned()
        } else {
            "mounts or loop devices were left behind".to_owned()
        });
        parts.join("; ")
    }
}

/// Prints each undo step's result (with the relevant log tail on failure) and
/// counts it in `summary`.
fn report_undo(cluster: &LocalCluster, summary: &mut Summary, results: Vec<demo::UndoResult>) {
    for (what, result) in results {
        match result {
            Ok(()) => {
                summary.undone += 1;
                println!("  {what}: ok");
            }
            Err(e) => {
                summary.undo_failed += 1;
                println!("  {what}: FAILED: {e:#}");
                let node_side = what.starts_with("Node") || what.contains("node plugin");
                print_log_tail(
                    cluster,
                    if node_side {
                        "node-plugin"
                    } else {
                        "controller"
                    },
                );
            }
        }
    }
}

/// Prints the last lines of daemon `name`'s log, if it was started.
pub fn print_log_tail(cluster: &LocalCluster, name: &str) {
    if let Some(d) = cluster.daemon(name) {
        println!(
            "  ---- last lines of {} ----\n{}\n  ----",
            d.log().display(),
            indent(&d.log_tail(LOG_TAIL_LINES))
        );
    }
}

/// SIGTERM's number, as `ExitStatus::signal` reports it.
fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}

/// Prints how a daemon stopped; returns whether that was clean.
fn report_stop(s: &Stopped) -> bool {
    let status = s
        .status
        .map_or("unknown status".to_owned(), |st| st.to_string());
    if s.exited_early {
        println!("  {}: had already exited ({status})", s.name);
        false
    } else if s.killed {
        println!(
            "  {}: did not stop after SIGTERM, killed ({status})",
            s.name
        );
        false
    } else if s.status.is_some_and(|st| st.success()) {
        println!("  {}: stopped", s.name);
        true
    } else if s
        .status
        .and_then(|st| st.signal())
        .is_some_and(|sig| sig == libc_sigterm())
    {
        // Still starting, before it watched SIGTERM: the default action is what we asked for.
        println!("  {}: stopped (by SIGTERM)", s.name);
        true
    } else {
        println!("  {}: stopped with {status}", s.name);
        false
    }
}
