//! What a sandbox run measured, and the report made of it: samples over time, reaction
//! times, the accounting of every task, a CSV, a Markdown summary and an SVG plot. Pure but
//! for writing the files.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

/// One look at the sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    /// Tasks waiting in the pool's queues.
    pub queued: u64,
    /// Tasks taken by workers and not acknowledged yet (running or prefetched).
    pub reserved: u64,
    /// The Deployment's `spec.replicas`: what the operator asked for.
    pub desired: u32,
    /// Workers ready.
    pub ready: u32,
    /// Tasks sent so far.
    pub sent: u64,
    /// Tasks completed so far.
    pub done: u64,
    /// Tasks that failed so far.
    pub failed: u64,
}

impl Sample {
    /// Tasks in the broker: waiting or reserved.
    pub fn backlog(&self) -> u64 {
        self.queued + self.reserved
    }
}

/// How fast the pool answered the first backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reaction {
    /// Seconds from the first backlog to the first scale-up request.
    pub to_scale_request: Option<f64>,
    /// Seconds from the first backlog to the first added worker being ready.
    pub to_ready: Option<f64>,
    /// Seconds from the backlog being gone for good (last sample with a backlog) to the
    /// first scale-down.
    pub drained_to_scale_down: Option<f64>,
}

/// Reaction times read from `samples` (in time order).
pub fn reaction(samples: &[Sample]) -> Reaction {
    let Some(first) = samples.first() else {
        return Reaction::default();
    };
    let start = samples.iter().find(|s| s.backlog() > 0);
    let after = |t0: f64, f: &dyn Fn(&Sample) -> bool| {
        samples.iter().find(|s| s.t >= t0 && f(s)).map(|s| s.t - t0)
    };
    let to_scale_request = start.and_then(|s| after(s.t, &|x| x.desired > first.desired));
    let to_ready = start.and_then(|s| after(s.t, &|x| x.ready > first.ready));
    let peak = samples.iter().map(|s| s.desired).max().unwrap_or(0);
    let drained = samples.iter().rev().find(|s| s.backlog() > 0);
    let drained_to_scale_down = drained.and_then(|d| {
        let peak_after = samples
            .iter()
            .filter(|s| s.t >= d.t)
            .map(|s| s.desired)
            .max()?;
        (peak_after == peak)
            .then(|| after(d.t, &|x| x.desired < peak))
            .flatten()
    });
    Reaction {
        to_scale_request,
        to_ready,
        drained_to_scale_down,
    }
}

/// The fate of every task sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Tasks sent.
    pub sent: u64,
    /// Tasks that completed.
    pub completed: u64,
    /// Tasks sent that never completed.
    pub lost: u64,
    /// Tasks that started more than once.
    pub run_more_than_once: u64,
}

/// Worker-seconds spent: the area under the ready workers.
pub fn replica_seconds(samples: &[Sample]) -> f64 {
    samples
        .windows(2)
        .map(|w| f64::from(w[0].ready) * (w[1].t - w[0].t))
        .sum()
}

/// A quantile of `values` (sorted, nearest rank), `None` when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// What one scaler achieved on a pool over a run: how long its tasks waited for a worker
/// and what the workers cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Which scaler, on which pool.
    pub scaler: String,
    /// Tasks whose wait was recorded.
    pub tasks: usize,
    /// Median wait, seconds.
    pub wait_p50: Option<f64>,
    /// 95th percentile wait, seconds.
    pub wait_p95: Option<f64>,
    /// Longest wait, seconds.
    pub wait_max: Option<f64>,
    /// Worker-seconds spent (see [`replica_seconds`]).
    pub replica_seconds: f64,
    /// Most replicas asked for.
    pub peak: u32,
}

impl Outcome {
    /// The outcome of a pool's `samples` and its tasks' `waits` (seconds, any order).
    pub fn of(scaler: &str, samples: &[Sample], waits: &[f64]) -> Outcome {
        let peak = samples.iter().map(|s| s.desired).max().unwrap_or(0);
        Outcome::from_waits(scaler, waits, replica_seconds(samples), peak)
    }

    /// The outcome of tasks' `waits` (seconds, any order) and what the workers cost.
    pub fn from_waits(scaler: &str, waits: &[f64], replica_seconds: f64, peak: u32) -> Outcome {
        let mut sorted: Vec<f64> = waits.iter().copied().filter(|w| w.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        Outcome {
            scaler: scaler.into(),
            tasks: sorted.len(),
            wait_p50: quantile(&sorted, 0.5),
            wait_p95: quantile(&sorted, 0.95),
            wait_max: sorted.last().copied(),
            replica_seconds,
            peak,
        }
    }
}

/// The outcomes as a Markdown section.
pub fn outcomes(rows: &[Outcome]) -> String {
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} s"));
    let mut out = String::from("## Task wait and cost\n\n");
    out.push_str("How long tasks waited for a worker (recorded by each task when it started, from the `published_at` header the app stamps) and the worker-seconds spent.\n\n");
    out.push_str(
        "| scaler | tasks | wait p50 | wait p95 | wait max | worker-seconds | most replicas |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {} |",
            r.scaler,
            r.tasks,
            secs(r.wait_p50),
            secs(r.wait_p95),
            secs(r.wait_max),
            r.replica_seconds,
            r.peak
        );
    }
    out
}

/// The samples as CSV.
pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from("t,queued,reserved,desired,ready,sent,done,failed\n");
    for s in samples {
        let _ = writeln!(
            out,
            "{:.2},{},{},{},{},{},{},{}",
            s.t, s.queued, s.reserved, s.desired, s.ready, s.sent, s.done, s.failed
        );
    }
    out
}

/// A line of figures to plot beside the run: a simulation's replicas and backlog.
pub struct Series<'a> {
    pub label: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// One line of a chart.
pub struct Line {
    /// Its legend.
    pub label: String,
    /// (seconds, value).
    pub points: Vec<(f64, f64)>,
    /// Its colour.
    pub color: RGBColor,
    /// Drawn dashed.
    pub dashed: bool,
}

/// Where a chart is drawn.
pub type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Draws `lines` on `area`, from 0 to `t_max` seconds and 0 to their highest value.
pub fn chart(area: &Area, caption: &str, t_max: f64, lines: Vec<Line>) -> Result<(), String> {
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max * 1.1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(|e| e.to_string())?;
    for line in lines {
        let color = line.color;
        let drawn = if line.dashed {
            chart.draw_series(DashedLineSeries::new(
                line.points,
                6,
                4,
                color.stroke_width(1),
            ))
        } else {
            chart.draw_series(LineSeries::new(line.points, color.stroke_width(2)))
        };
        drawn
            .map_err(|e| e.to_string())?
            .label(line.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Draws backlog and replicas over time as SVG: the run's own lines, and `extra` lines (a
/// simulation's) dashed, beside the replicas when their label says so, else the backlog.
pub fn plot(samples: &[Sample], extra: &[Series], title: &str) -> Result<String, String> {
    let line = |label: &str, color, f: &dyn Fn(&Sample) -> f64| Line {
        label: label.to_string(),
        points: samples.iter().map(|s| (s.t, f(s))).collect(),
        color,
        dashed: false,
    };
    let mut backlog = vec![line("backlog (queued + reserved)", RED, &|s| {
        s.backlog() as f64
    })];
    let mut replicas = vec![
        line("replicas asked for", BLUE, &|s| f64::from(s.desired)),
        line("workers ready", GREEN, &|s| f64::from(s.ready)),
    ];
    for e in extra {
        let dashed = Line {
            label: e.label.to_string(),
            points: e.points.clone(),
            color: BLACK,
            dashed: true,
        };
        if e.label.contains("replicas") {
            replicas.push(dashed);
        } else {
            backlog.push(dashed);
        }
    }
    let t_max = backlog
        .iter()
        .chain(&replicas)
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(300);
        chart(&top, &format!("{title}: backlog"), t_max, backlog)?;
        chart(&bottom, "replicas", t_max, replicas)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The report's text (Markdown).
pub fn markdown(
    title: &str,
    accounting: &Accounting,
    reaction: &Reaction,
    samples: &[Sample],
    comparison: Option<&str>,
) -> String {
    let secs = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.1} s"));
    let mut out = String::new();
    let _ = writeln!(out, "# {title}\n");
    let _ = writeln!(out, "![backlog and replicas](report.svg)\n");
    let _ = writeln!(out, "## Tasks\n");
    let _ = writeln!(out, "| sent | completed | lost | run more than once |");
    let _ = writeln!(out, "|---|---|---|---|");
    let _ = writeln!(
        out,
        "| {} | {} | **{}** | {} |\n",
        accounting.sent, accounting.completed, accounting.lost, accounting.run_more_than_once
    );
    let _ = writeln!(out, "## Reaction (sampled every 0.25 s)\n");
    let _ = writeln!(
        out,
        "- first backlog -> scale-up asked for: {}",
        secs(reaction.to_scale_request)
    );
    let _ = writeln!(
        out,
        "- first backlog -> an added worker ready: {}",
        secs(reaction.to_ready)
    );
    let _ = writeln!(
        out,
        "- backlog gone -> first scale-down: {}",
        secs(reaction.drained_to_scale_down)
    );
    let peak = samples.iter().map(|s| s.desired).max().unwrap_or(0);
    let _ = writeln!(out, "- most replicas asked for: {peak}");
    let _ = writeln!(
        out,
        "- worker-seconds spent (ready workers over time): {:.0}\n",
        replica_seconds(samples)
    );
    if let Some(c) = comparison {
        let _ = writeln!(out, "{c}");
    }
    let _ = writeln!(
        out,
        "Files: `samples.csv` (every sample), `operator.log`, `pods/*.log`, `kubeconfig`."
    );
    out
}

/// Writes `name` in `dir`.
pub fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, queued: u64, reserved: u64, desired: u32, ready: u32) -> Sample {
        Sample {
            t,
            queued,
            reserved,
            desired,
            ready,
            ..Default::default()
        }
    }

    #[test]
    fn reaction_times_are_read_from_the_samples() {
        let samples = [
            s(0.0, 0, 0, 1, 1),
            s(1.0, 40, 0, 1, 1),
            s(2.5, 30, 4, 8, 1),
            s(12.0, 10, 20, 8, 5),
            s(20.0, 0, 8, 8, 8),
            s(21.0, 0, 0, 8, 8),
            s(51.0, 0, 0, 2, 2),
        ];
        let r = reaction(&samples);
        assert_eq!(r.to_scale_request, Some(1.5));
        assert_eq!(r.to_ready, Some(11.0));
        assert_eq!(r.drained_to_scale_down, Some(31.0));
        assert_eq!(
            replica_seconds(&samples),
            1.0 + 1.5 + 9.5 + 5.0 * 8.0 + 8.0 + 8.0 * 30.0
        );
        assert_eq!(reaction(&[]), Reaction::default());
        let idle = reaction(&[s(0.0, 0, 0, 1, 1), s(1.0, 0, 0, 1, 1)]);
        assert_eq!(idle.to_scale_request, None);
    }

    #[test]
    fn the_plot_and_the_report_show_the_run() {
        let samples = [s(0.0, 0, 0, 1, 1), s(1.0, 40, 0, 8, 1), s(2.0, 0, 0, 8, 8)];
        let sim = Series {
            label: "simulated KEDA + HPA replicas",
            points: vec![(0.0, 1.0), (30.0, 8.0)],
        };
        let svg = plot(&samples, &[sim], "burst").unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        for label in [
            "backlog (queued + reserved)",
            "workers ready",
            "simulated KEDA",
        ] {
            assert!(svg.contains(label), "{label}");
        }
        let accounting = Accounting {
            sent: 40,
            completed: 40,
            lost: 0,
            run_more_than_once: 0,
        };
        let md = markdown("burst", &accounting, &reaction(&samples), &samples, None);
        assert!(md.contains("| 40 | 40 | **0** | 0 |"), "{md}");
        assert!(md.contains("scale-up asked for: 0.0 s"), "{md}");
        assert_eq!(csv(&samples).lines().count(), 4);
    }

    #[test]
    fn outcomes_give_wait_percentiles_and_cost() {
        let samples = [
            s(0.0, 0, 0, 1, 1),
            s(10.0, 40, 0, 4, 2),
            s(20.0, 0, 0, 1, 1),
        ];
        let waits: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let o = Outcome::of("latency", &samples, &waits);
        assert_eq!((o.tasks, o.peak), (20, 4));
        assert_eq!(
            (o.wait_p50, o.wait_p95, o.wait_max),
            (Some(10.0), Some(19.0), Some(20.0))
        );
        assert_eq!(o.replica_seconds, 10.0 + 20.0);
        let none = Outcome::of("queue-length", &samples, &[]);
        assert_eq!(none.wait_p50, None);
        let md = outcomes(&[o, none]);
        assert!(
            md.contains("| latency | 20 | 10.0 s | 19.0 s | 20.0 s | 30 | 4 |"),
            "{md}"
        );
        assert!(
            md.contains("| queue-length | 0 | - | - | - | 30 | 4 |"),
            "{md}"
        );
    }
}
