//! The live view of a sandbox run: one frame a second on a terminal (drawn over the last
//! one), a line every ten seconds otherwise (a log, CI).

use std::fmt::Write as _;

use super::report::Sample;

/// One frame: every pool's figures and the scenario's progress.
pub fn frame(pools: &[(&str, Sample)], progress: f64, phase: &str) -> String {
    let width = 30;
    let filled = ((progress.clamp(0.0, 1.0)) * width as f64).round() as usize;
    let t = pools.first().map_or(0.0, |p| p.1.t);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "celery-operator sandbox  {t:>6.0} s  [{}{}] {:>3.0}%  {phase}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        progress * 100.0
    );
    let _ = writeln!(
        out,
        "{:<12} {:>7} {:>9} {:>8} {:>6}",
        "pool", "queued", "reserved", "desired", "ready"
    );
    for (name, s) in pools {
        let _ = writeln!(
            out,
            "{name:<12} {:>7} {:>9} {:>8} {:>6}",
            s.queued, s.reserved, s.desired, s.ready
        );
    }
    if let Some((_, s)) = pools.first() {
        let _ = writeln!(
            out,
            "tasks: {} sent, {} done, {} failed",
            s.sent, s.done, s.failed
        );
    }
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
    fn a_frame_shows_every_pool_and_the_progress() {
        let s = Sample {
            t: 12.0,
            queued: 40,
            reserved: 8,
            desired: 6,
            ready: 2,
            sent: 48,
            done: 0,
            failed: 1,
        };
        let other = Sample {
            queued: 1,
            desired: 1,
            ready: 1,
            ..s
        };
        let f = frame(&[("work", s), ("mail", other)], 0.5, "sending");
        let lines: Vec<&str> = f.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].contains(&format!("[{}{}]  50%", "#".repeat(15), ".".repeat(15))));
        let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(words(lines[2]), ["work", "40", "8", "6", "2"]);
        assert_eq!(words(lines[3]), ["mail", "1", "8", "1", "1"]);
        assert_eq!(lines[4], "tasks: 48 sent, 0 done, 1 failed");
    }
}
