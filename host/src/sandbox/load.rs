//! The load of a sandbox scenario: how many tasks are sent in each second, and how long each
//! works. Pure: the same trace drives the real run and the simulation it is compared with.

use std::fmt;
use std::str::FromStr;

/// The tasks sent in one second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Second {
    /// Tasks sent in this second.
    pub tasks: u32,
    /// How long each of them works, in seconds.
    pub task_seconds: f64,
}

/// A load, second by second from the start of the scenario.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    pub seconds: Vec<Second>,
}

/// A built-in shape of load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Every task at once, at the start: a backlog to scale up for, then nothing.
    Burst,
    /// From nothing to twice the rate, evenly, over the duration.
    Ramp,
    /// The rate, every second.
    Steady,
    /// Ten times the rate for two seconds out of every twenty, nothing in between.
    Spikes,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let name = match self {
            Profile::Burst => "burst",
            Profile::Ramp => "ramp",
            Profile::Steady => "steady",
            Profile::Spikes => "spikes",
        };
        f.write_str(name)
    }
}

impl Profile {
    /// The trace of this profile: `rate` tasks per second on average over `duration`
    /// seconds, each working `task_seconds`.
    pub fn trace(self, duration: u32, rate: f64, task_seconds: f64) -> Trace {
        let n = duration.max(1) as usize;
        let per_second: Vec<f64> = (0..n)
            .map(|s| match self {
                Profile::Burst if s == 0 => rate * n as f64,
                Profile::Burst => 0.0,
                Profile::Ramp => 2.0 * rate * (s as f64 + 0.5) / n as f64,
                Profile::Steady => rate,
                Profile::Spikes if s % 20 < 2 => 10.0 * rate,
                Profile::Spikes => 0.0,
            })
            .collect();
        Trace::from_rates(&per_second, task_seconds)
    }
}

impl Trace {
    /// A trace sending `rates[s]` tasks in second `s`; fractions carry over to the next
    /// second, so the total is the sum of the rates, rounded.
    fn from_rates(rates: &[f64], task_seconds: f64) -> Trace {
        let mut owed = 0.0;
        let seconds = rates
            .iter()
            .map(|rate| {
                owed += rate.max(0.0);
                let tasks = (owed + 1e-9).floor();
                owed -= tasks;
                Second {
                    tasks: tasks as u32,
                    task_seconds,
                }
            })
            .collect();
        Trace { seconds }
    }

    /// Tasks in the whole trace.
    pub fn total_tasks(&self) -> u64 {
        self.seconds.iter().map(|s| u64::from(s.tasks)).sum()
    }

    /// The trace's length in seconds.
    pub fn duration(&self) -> usize {
        self.seconds.len()
    }

    /// The longest a task of the trace works, in seconds.
    pub fn longest_task(&self) -> f64 {
        self.seconds
            .iter()
            .filter(|s| s.tasks > 0)
            .map(|s| s.task_seconds)
            .fold(0.0, f64::max)
    }
}

/// A trace read from CSV: a header line, then `second,tasks,task_seconds` per line (seconds
/// from 0, in order; a second left out sends nothing).
impl FromStr for Trace {
    type Err = String;

    fn from_str(csv: &str) -> Result<Trace, String> {
        const MAX_SECONDS: usize = 24 * 3600;
        let mut seconds: Vec<Second> = Vec::new();
        for (i, line) in csv.lines().enumerate().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [second, tasks, task_seconds] = fields[..] else {
                return Err(bad("expected second,tasks,task_seconds"));
            };
            let second: usize = second
                .parse()
                .map_err(|_| bad("second is not a whole number"))?;
            let tasks: u32 = tasks
                .parse()
                .map_err(|_| bad("tasks is not a whole number"))?;
            let task_seconds: f64 = task_seconds
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && (0.0..=86_400.0).contains(s))
                .ok_or_else(|| bad("task_seconds is not a number of seconds up to 86400"))?;
            if second >= MAX_SECONDS {
                return Err(bad("a trace is at most a day long"));
            }
            if second < seconds.len() {
                return Err(bad("seconds must increase"));
            }
            seconds.resize(
                second,
                Second {
                    tasks: 0,
                    task_seconds,
                },
            );
            seconds.push(Second {
                tasks,
                task_seconds,
            });
        }
        if seconds.is_empty() {
            return Err("the trace has no lines after its header".into());
        }
        Ok(Trace { seconds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(t: &Trace) -> Vec<u32> {
        t.seconds.iter().map(|s| s.tasks).collect()
    }

    #[test]
    fn profiles_send_the_rate_on_average() {
        for profile in [
            Profile::Burst,
            Profile::Ramp,
            Profile::Steady,
            Profile::Spikes,
        ] {
            let t = profile.trace(60, 2.5, 3.0);
            assert_eq!(t.duration(), 60, "{profile}");
            assert_eq!(t.total_tasks(), 150, "{profile}");
            assert_eq!(t.longest_task(), 3.0);
        }
        assert_eq!(tasks(&Profile::Burst.trace(4, 2.0, 1.0)), [8, 0, 0, 0]);
        assert_eq!(tasks(&Profile::Steady.trace(4, 1.5, 1.0)), [1, 2, 1, 2]);
        assert_eq!(tasks(&Profile::Ramp.trace(4, 2.0, 1.0)), [0, 2, 2, 4]);
        let spikes = tasks(&Profile::Spikes.trace(40, 1.0, 1.0));
        assert_eq!(spikes[..3], [10, 10, 0]);
        assert_eq!(spikes[20..23], [10, 10, 0]);
    }

    #[test]
    fn a_csv_trace_is_read_and_checked() {
        let t: Trace = "second,tasks,task_seconds\n0,5,2\n\n3,1,0.5\n"
            .parse()
            .unwrap();
        assert_eq!(tasks(&t), [5, 0, 0, 1]);
        assert_eq!(t.seconds[3].task_seconds, 0.5);
        assert_eq!(t.longest_task(), 2.0);
        for (csv, error) in [
            ("h\n", "no lines"),
            ("h\n1,2\n", "line 2: expected second,tasks,task_seconds"),
            ("h\n2,1,1\n1,1,1\n", "line 3: seconds must increase"),
            ("h\n0,-1,1\n", "tasks is not a whole number"),
            ("h\n0,1,NaN\n", "task_seconds"),
            ("h\n99999999,1,1\n", "at most a day"),
        ] {
            let e = csv.parse::<Trace>().unwrap_err();
            assert!(e.contains(error), "{csv:?}: {e}");
        }
    }
}
