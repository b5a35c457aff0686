//! `business-hours`: an example scaler plugin that scales on queue length, like the
//! `queue-length` plugin, and keeps at least `minDuringBusinessHours` replicas during
//! business hours.
//!
//! It shows the three things most custom scalers need:
//!
//! * the SDK (`celery_operator_plugin_sdk`): the `scaler::Guest` trait, the
//!   `export_scaler!` macro and `parse_settings`;
//! * reuse of the `queue-length` plugin's maths, which the SDK carries as a library
//!   (`celery_operator_plugin_sdk::queue_length::decide`);
//! * time from the input (`now-ms`), never from a clock: the host grants none, and a
//!   plugin that is a pure function of its input is easy to test.
//!
//! Settings (all optional; any other key is passed on to the queue-length maths, e.g.
//! `tolerance` or `scaleDownStabilizationSeconds`):
//!
//! ```json
//! {"utcOffsetHours": 0, "startHour": 9, "endHour": 18, "minDuringBusinessHours": 3, "weekdaysOnly": true}
//! ```

use celery_operator_plugin_sdk::parse_settings;
use celery_operator_plugin_sdk::queue_length::{self, Settings};
use celery_operator_plugin_sdk::scaler::{Decision, Guest, ScalingInput};
use celery_operator_plugin_sdk::serde_json::{Map, Value};
use serde::Deserialize;

/// This plugin's own settings.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct BusinessHours {
    /// Offset of the business's local time from UTC, in hours (`-5`, `5.5`). No daylight
    /// saving: change it twice a year, or run the plugin twice with two settings.
    pub utc_offset_hours: f64,
    /// First hour of business, local time (0–23).
    pub start_hour: u32,
    /// Hour business ends, local time (1–24, exclusive). Below `startHour` for hours that
    /// span midnight (22 to 6).
    pub end_hour: u32,
    /// The floor during business hours (capped at `max-replicas`).
    pub min_during_business_hours: u32,
    /// Only Monday to Friday are business days.
    pub weekdays_only: bool,
}

/// The setting names of [`BusinessHours`]; all others go to the queue-length maths.
const KEYS: [&str; 5] = [
    "utcOffsetHours",
    "startHour",
    "endHour",
    "minDuringBusinessHours",
    "weekdaysOnly",
];

impl Default for BusinessHours {
    fn default() -> Self {
        BusinessHours {
            utc_offset_hours: 0.0,
            start_hour: 9,
            end_hour: 18,
            min_during_business_hours: 3,
            weekdays_only: true,
        }
    }
}

const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Local time, enough to tell business hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Monday … 6 = Sunday.
    pub weekday: usize,
    /// 0–23.
    pub hour: u32,
    /// 0–59.
    pub minute: u32,
}

impl BusinessHours {
    /// Checks the settings' ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(-12.0..=14.0).contains(&self.utc_offset_hours) {
            return Err(format!(
                "settings.utcOffsetHours: must be between -12 and 14, got {}",
                self.utc_offset_hours
            ));
        }
        if self.start_hour > 23 {
            return Err(format!(
                "settings.startHour: must be 0 to 23, got {}",
                self.start_hour
            ));
        }
        if self.end_hour > 24 {
            return Err(format!(
                "settings.endHour: must be 0 to 24, got {}",
                self.end_hour
            ));
        }
        if self.start_hour == self.end_hour {
            return Err(format!(
                "settings.endHour: equals startHour ({}), which leaves no business hours",
                self.start_hour
            ));
        }
        Ok(())
    }

    /// The local time at `now_ms` (milliseconds since the Unix epoch, UTC).
    pub fn local_time(&self, now_ms: u64) -> LocalTime {
        let offset_seconds = (self.utc_offset_hours * 3600.0).round() as i64;
        let seconds = (now_ms / 1000) as i64 + offset_seconds;
        let days = seconds.div_euclid(86_400);
        let of_day = seconds.rem_euclid(86_400);
        LocalTime {
            // 1970-01-01 was a Thursday (index 3).
            weekday: (days + 3).rem_euclid(7) as usize,
            hour: (of_day / 3600) as u32,
            minute: (of_day % 3600 / 60) as u32,
        }
    }

    /// Whether `t` is within business hours.
    pub fn is_open(&self, t: LocalTime) -> bool {
        let in_hours = if self.start_hour < self.end_hour {
            (self.start_hour..self.end_hour).contains(&t.hour)
        } else {
            t.hour >= self.start_hour || t.hour < self.end_hour
        };
        in_hours && (!self.weekdays_only || t.weekday < 5)
    }
}

/// Splits the settings JSON into this plugin's settings and the queue-length ones.
fn split_settings(settings: &str) -> Result<(BusinessHours, Settings), String> {
    let mut all: Map<String, Value> = parse_settings(settings)?;
    let mine: Map<String, Value> = KEYS
        .iter()
        .filter_map(|k| all.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    let hours: BusinessHours = parse_settings(&Value::Object(mine).to_string())?;
    hours.validate()?;
    let queue = Settings::parse(&Value::Object(all).to_string())?;
    Ok((hours, queue))
}

/// The decision: the queue-length maths with `min-replicas` raised to the business-hours
/// floor while business is open.
pub fn decide(
    input: &ScalingInput,
    hours: &BusinessHours,
    queue: &Settings,
) -> Result<Decision, String> {
    let t = hours.local_time(input.now_ms);
    let when = format!(
        "{} {:02}:{:02} at UTC{:+}",
        WEEKDAYS[t.weekday], t.hour, t.minute, hours.utc_offset_hours
    );
    let mut input = input.clone();
    let prefix = if hours.is_open(t) {
        let floor = hours
            .min_during_business_hours
            .min(input.max_replicas)
            .max(input.min_replicas);
        input.min_replicas = floor;
        format!("business hours ({when}), at least {floor}")
    } else {
        format!("outside business hours ({when})")
    };
    let mut decision = queue_length::decide(&input, queue)?;
    decision.reason = format!("{prefix}: {}", decision.reason);
    Ok(decision)
}

/// The plugin.
pub struct BusinessHoursScaler;

impl Guest for BusinessHoursScaler {
    fn decide(input: ScalingInput) -> Result<Decision, String> {
        let (hours, queue) = split_settings(&input.settings)?;
        decide(&input, &hours, &queue)
    }
}

celery_operator_plugin_sdk::export_scaler!(BusinessHoursScaler);

#[cfg(test)]
mod tests {
    use super::*;
    use celery_operator_plugin_sdk::scaler::{QueueDepth, Sample, Workload};

    /// Monday 2024-01-15 00:00:00 UTC.
    const MONDAY: u64 = 1_705_276_800_000;
    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;

    fn input(now_ms: u64, current: u32, ready: u64, settings: &str) -> ScalingInput {
        ScalingInput {
            pool: "default".into(),
            now_ms,
            current_replicas: current,
            min_replicas: 0,
            max_replicas: 10,
            target_per_replica: 5.0,
            samples: vec![Sample {
                at_ms: now_ms,
                queues: vec![QueueDepth {
                    name: "celery".into(),
                    ready,
                    reserved: 0,
                    oldest_wait_ms: None,
                }],
            }],
            history: vec![],
            workload: Workload::default(),
            settings: settings.into(),
        }
    }

    fn run(i: ScalingInput) -> Decision {
        BusinessHoursScaler::decide(i).unwrap()
    }

    #[test]
    fn local_time_and_weekday() {
        let h = BusinessHours::default();
        let t = h.local_time(MONDAY + 10 * HOUR + 30 * 60_000);
        assert_eq!(
            t,
            LocalTime {
                weekday: 0,
                hour: 10,
                minute: 30
            }
        );
        assert_eq!(h.local_time(MONDAY + 5 * DAY).weekday, 5); // Saturday
        // UTC-5: Monday 03:00 UTC is Sunday 22:00 local.
        let h = BusinessHours {
            utc_offset_hours: -5.0,
            ..Default::default()
        };
        let t = h.local_time(MONDAY + 3 * HOUR);
        assert_eq!((t.weekday, t.hour), (6, 22));
    }

    #[test]
    fn floor_during_business_hours() {
        let d = run(input(MONDAY + 10 * HOUR, 0, 0, "{}"));
        assert_eq!(d.replicas, 3);
        // The raw recommendation of the queue-length maths, before the floor.
        assert_eq!(d.recommendation, 0);
        assert!(
            d.reason
                .starts_with("business hours (Mon 10:00 at UTC+0), at least 3: backlog 0"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn queue_length_still_scales_above_the_floor() {
        let d = run(input(MONDAY + 10 * HOUR, 3, 40, "{}"));
        assert_eq!(d.replicas, 8);
    }

    #[test]
    fn no_floor_outside_hours_or_at_weekends() {
        let d = run(input(MONDAY + 18 * HOUR, 0, 0, "{}"));
        assert_eq!(d.replicas, 0);
        assert!(
            d.reason
                .starts_with("outside business hours (Mon 18:00 at UTC+0): "),
            "{}",
            d.reason
        );
        assert_eq!(
            run(input(MONDAY + 5 * DAY + 10 * HOUR, 0, 0, "{}")).replicas,
            0
        );
        // Unless weekends count.
        let s = r#"{"weekdaysOnly": false}"#;
        assert_eq!(
            run(input(MONDAY + 5 * DAY + 10 * HOUR, 0, 0, s)).replicas,
            3
        );
    }

    #[test]
    fn utc_offset() {
        // 08:00 UTC is 10:00 at UTC+2: open.
        let s = r#"{"utcOffsetHours": 2}"#;
        assert_eq!(run(input(MONDAY + 8 * HOUR, 0, 0, s)).replicas, 3);
        // 08:00 UTC is 08:00 at UTC+0: closed.
        assert_eq!(run(input(MONDAY + 8 * HOUR, 0, 0, "{}")).replicas, 0);
    }

    #[test]
    fn hours_across_midnight() {
        let s = r#"{"startHour": 22, "endHour": 6, "weekdaysOnly": false, "minDuringBusinessHours": 2}"#;
        assert_eq!(run(input(MONDAY + 23 * HOUR, 0, 0, s)).replicas, 2);
        assert_eq!(run(input(MONDAY + 5 * HOUR, 0, 0, s)).replicas, 2);
        assert_eq!(run(input(MONDAY + 12 * HOUR, 0, 0, s)).replicas, 0);
    }

    #[test]
    fn floor_capped_at_max_replicas() {
        let mut i = input(
            MONDAY + 10 * HOUR,
            0,
            0,
            r#"{"minDuringBusinessHours": 50}"#,
        );
        i.max_replicas = 4;
        assert_eq!(run(i).replicas, 4);
    }

    #[test]
    fn other_settings_go_to_queue_length() {
        // Scale-down from 6 to 3 (the floor) held by queue-length's window, unless the
        // window is set to 0.
        let mut i = input(MONDAY + 10 * HOUR, 6, 0, "{}");
        i.history = vec![celery_operator_plugin_sdk::scaler::Recommendation {
            at_ms: MONDAY + 10 * HOUR - 60_000,
            replicas: 6,
        }];
        assert_eq!(run(i.clone()).replicas, 6);
        i.settings = r#"{"scaleDownStabilizationSeconds": 0, "startHour": 8}"#.into();
        assert_eq!(run(i).replicas, 3);
    }

    #[test]
    fn settings_errors() {
        let err = BusinessHoursScaler::decide(input(MONDAY, 0, 0, r#"{"startHour": "9am"}"#))
            .unwrap_err();
        assert!(err.starts_with("settings.startHour: invalid type"), "{err}");
        let err =
            BusinessHoursScaler::decide(input(MONDAY, 0, 0, r#"{"endHour": 25}"#)).unwrap_err();
        assert_eq!(err, "settings.endHour: must be 0 to 24, got 25");
        let err =
            BusinessHoursScaler::decide(input(MONDAY, 0, 0, r#"{"tolerence": 1}"#)).unwrap_err();
        assert!(
            err.starts_with("settings.tolerence: unknown field"),
            "{err}"
        );
    }
}
