//! The rate limits of a pool's `autoscaling.behavior`, applied to every scaler plugin's
//! decision exactly as the Kubernetes HPA controller applies its own
//! (`convertDesiredReplicasWithBehaviorRate`, `calculateScaleUpLimitWithScalingRules`,
//! `calculateScaleDownLimitWithBehaviors` in `pkg/controller/podautoscaler/horizontal.go`).
//! Pure: the scale events are passed in.

use crate::crd::{PolicyType, ScalingBehavior, ScalingPolicy, ScalingRules, SelectPolicy};

/// A replica change the scaler made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Replicas before.
    pub from: u32,
    /// Replicas after.
    pub to: u32,
}

/// How long scale events matter: the longest policy period Kubernetes allows.
pub const EVENTS_MS: u64 = 1800 * 1000;

/// The HPA's default rules for scaling up: 100 % or 4 pods per 15 s, whichever is more.
fn default_up() -> Vec<ScalingPolicy> {
    vec![
        ScalingPolicy {
            type_: PolicyType::Percent,
            value: 100,
            period_seconds: 15,
        },
        ScalingPolicy {
            type_: PolicyType::Pods,
            value: 4,
            period_seconds: 15,
        },
    ]
}

/// The HPA's default rule for scaling down: 100 % per 15 s.
fn default_down() -> Vec<ScalingPolicy> {
    vec![ScalingPolicy {
        type_: PolicyType::Percent,
        value: 100,
        period_seconds: 15,
    }]
}

/// The rules of one direction with the API server's defaulting: an unset direction, or
/// unset policies or select policy, take the HPA's defaults.
fn rules(
    given: Option<&ScalingRules>,
    defaults: fn() -> Vec<ScalingPolicy>,
) -> (SelectPolicy, Vec<ScalingPolicy>) {
    let select = given
        .and_then(|r| r.select_policy)
        .unwrap_or(SelectPolicy::Max);
    let policies = given
        .map(|r| r.policies.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(defaults);
    (select, policies)
}

/// Replicas added (`up`) or removed (`!up`) by the changes of the last `period_seconds`.
fn changed_in_period(changes: &[Change], now_ms: u64, period_seconds: i32, up: bool) -> i64 {
    let cutoff = now_ms.saturating_sub(u64::try_from(period_seconds).unwrap_or(0) * 1000);
    changes
        .iter()
        .filter(|c| c.at_ms > cutoff && (c.to > c.from) == up && c.to != c.from)
        .map(|c| (i64::from(c.to) - i64::from(c.from)).abs())
        .sum()
}

/// Replicas at the start of a policy's period: now, less what was added, plus what was
/// removed in it.
fn period_start(current: u32, changes: &[Change], now_ms: u64, period: i32) -> i64 {
    i64::from(current) - changed_in_period(changes, now_ms, period, true)
        + changed_in_period(changes, now_ms, period, false)
}

/// The most (`up`) or fewest (`!up`) replicas the rules allow now
/// (`calculateScaleUpLimitWithScalingRules`, `calculateScaleDownLimitWithBehaviors`).
fn rate_limit(
    current: u32,
    changes: &[Change],
    now_ms: u64,
    rules: &(SelectPolicy, Vec<ScalingPolicy>),
    up: bool,
) -> i64 {
    let (select, policies) = rules;
    let proposals = policies.iter().map(|p| {
        let start = period_start(current, changes, now_ms, p.period_seconds);
        let value = i64::from(p.value);
        match (p.type_, up) {
            (PolicyType::Pods, true) => start + value,
            (PolicyType::Pods, false) => start - value,
            // Rounded up, or a small pool could never grow.
            (PolicyType::Percent, true) => {
                (start as f64 * (1.0 + value as f64 / 100.0)).ceil() as i64
            }
            // Truncated, as Go's int32 conversion does.
            (PolicyType::Percent, false) => (start as f64 * (1.0 - value as f64 / 100.0)) as i64,
        }
    });
    // `Max` picks the policy allowing the largest change: the highest limit up, the lowest
    // down; `Min` the other way round.
    let (largest, smallest) = if up {
        (proposals.clone().max(), proposals.min())
    } else {
        (proposals.clone().min(), proposals.max())
    };
    match select {
        SelectPolicy::Disabled => i64::from(current),
        SelectPolicy::Max => largest.unwrap_or(i64::from(current)),
        SelectPolicy::Min => smallest.unwrap_or(i64::from(current)),
    }
}

/// `desired` (already within `[min, max]`) limited by the behavior's rate limits, given the
/// recent `changes`; and why, when a limit changed it.
pub fn limit(
    behavior: &ScalingBehavior,
    current: u32,
    desired: u32,
    min: u32,
    max: u32,
    changes: &[Change],
    now_ms: u64,
) -> (u32, Option<String>) {
    let clamp = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
    if desired > current {
        let rules = rules(behavior.scale_up.as_ref(), default_up);
        let up = rate_limit(current, changes, now_ms, &rules, true).max(i64::from(current));
        let allowed = clamp(up).min(max);
        if desired > allowed {
            let why =
                format!("scale-up to {desired} limited by autoscaling.behavior.scaleUp: {allowed}");
            return (allowed, Some(why));
        }
    } else if desired < current {
        let rules = rules(behavior.scale_down.as_ref(), default_down);
        let down = rate_limit(current, changes, now_ms, &rules, false).min(i64::from(current));
        let allowed = clamp(down).max(min);
        if desired < allowed {
            let why = format!(
                "scale-down to {desired} limited by autoscaling.behavior.scaleDown: {allowed}"
            );
            return (allowed, Some(why));
        }
    }
    (desired, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_428_000_000;

    fn behavior(json: serde_json::Value) -> ScalingBehavior {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_hpa_defaults_double_or_add_four_per_15_seconds() {
        let b = ScalingBehavior::default();
        assert_eq!(limit(&b, 1, 20, 0, 100, &[], NOW).0, 5);
        assert_eq!(limit(&b, 10, 50, 0, 100, &[], NOW).0, 20);
        assert_eq!(
            limit(&b, 10, 50, 0, 15, &[], NOW).0,
            15,
            "max still applies"
        );
        // Scaling down: 100 % per 15 s is no limit.
        assert_eq!(limit(&b, 10, 0, 0, 100, &[], NOW).0, 0);
        assert_eq!(limit(&b, 10, 0, 2, 100, &[], NOW).0, 2, "min still applies");
    }

    #[test]
    fn changes_in_the_period_count_against_it() {
        let b = ScalingBehavior::default();
        // Just went 1 -> 5: the period started at 1, so at most 5 now.
        let recent = [Change {
            at_ms: NOW - 5_000,
            from: 1,
            to: 5,
        }];
        assert_eq!(limit(&b, 5, 20, 0, 100, &recent, NOW).0, 5);
        // 16 s later the period is over: from 5, at most 10.
        assert_eq!(limit(&b, 5, 20, 0, 100, &recent, NOW + 11_000).0, 10);
    }

    #[test]
    fn select_policies_and_pods_limits() {
        let b = behavior(serde_json::json!({
            "scaleUp": {"selectPolicy": "Min", "policies": [
                {"type": "Pods", "value": 2, "periodSeconds": 60},
                {"type": "Percent", "value": 50, "periodSeconds": 60}]},
            "scaleDown": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}
        }));
        assert_eq!(limit(&b, 10, 30, 0, 100, &[], NOW).0, 12);
        assert_eq!(limit(&b, 10, 3, 0, 100, &[], NOW).0, 9);
        let disabled = behavior(serde_json::json!({"scaleDown": {"selectPolicy": "Disabled"}}));
        assert_eq!(limit(&disabled, 10, 3, 0, 100, &[], NOW).0, 10);
        let (_, why) = limit(&disabled, 10, 3, 0, 100, &[], NOW);
        assert_eq!(
            why.unwrap(),
            "scale-down to 3 limited by autoscaling.behavior.scaleDown: 10"
        );
    }
}
