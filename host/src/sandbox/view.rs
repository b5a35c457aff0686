//! The live view of a sandbox run: one frame a second on a terminal (drawn over the last
//! one), a line every ten seconds otherwise (a log, CI).

use std::fmt::Write as _;

use super::report::Sample;

/// One frame: the pool's figures and the scenario's progress.
pub fn frame(pool: &str, s: &Sample, failed: u64, progress: f64, phase: &str) -> String {
    let width = 30;
    let filled = ((progress.clamp(0.0, 1.0)) * width as f64).round() as usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "celery-operator sandbox  {:>6.0} s  [{}{}] {:>3.0}%  {phase}",
        s.t,
        "#".repeat(filled),
        ".".repeat(width - filled),
        progress * 100.0
    );
    let _ = writeln!(
        out,
        "{:<12} {:>7} {:>9} {:>8} {:>6} {:>7} {:>7} {:>7}",
        "pool", "queued", "reserved", "desired", "ready", "sent", "done", "failed"
    );
    let _ = writeln!(
        out,
        "{:<12} {:>7} {:>9} {:>8} {:>6} {:>7} {:>7} {:>7}",
        pool, s.queued, s.reserved, s.desired, s.ready, s.sent, s.done, failed
    );
    out
}

/// Prints frames: over the previous one on a terminal, as plain lines otherwise.
pub struct View {
    terminal: bool,
    lines: usize,
    last_line: f64,
}

impl Default for View {
    fn default() -> View {
        use std::io::IsTerminal;
        View {
            terminal: std::io::stdout().is_terminal(),
            lines: 0,
            last_line: f64::NEG_INFINITY,
        }
    }
}

impl View {
    /// Shows `frame` taken at `t` seconds; `last` shows it whatever the time.
    pub fn show(&mut self, frame: &str, t: f64, last: bool) {
        if self.terminal {
            // Up to the previous frame's first line, clear to the end of the screen.
            if self.lines > 0 {
                print!("\x1b[{}F\x1b[J", self.lines);
            }
            print!("{frame}");
            self.lines = frame.lines().count();
        } else if last || t - self.last_line >= 10.0 {
            print!("{frame}");
            self.last_line = t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_shows_the_pool_and_the_progress() {
        let s = Sample {
            t: 12.0,
            queued: 40,
            reserved: 8,
            desired: 6,
            ready: 2,
            sent: 48,
            done: 0,
        };
        let f = frame("work", &s, 1, 0.5, "sending");
        let lines: Vec<&str> = f.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains(&format!("[{}{}]  50%", "#".repeat(15), ".".repeat(15))));
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["work", "40", "8", "6", "2", "48", "0", "1"]
        );
    }
}
