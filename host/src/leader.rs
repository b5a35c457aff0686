//! Leader election on a coordination.k8s.io Lease, for running more than one replica of the
//! operator: only the holder of the Lease reconciles. A replica that cannot renew the Lease
//! before it expires stops (and is restarted by its Deployment), so two leaders never act at
//! once for longer than a renew period.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::PostParams;
use tracing::{info, warn};

/// How long a Lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews it, and others retry.
pub const RENEW_PERIOD: Duration = Duration::from_secs(5);

/// What to do with the Lease as it is now.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nobody holds it: create it.
    Create,
    /// We hold it, or its holder let it expire: write ourselves in.
    Take,
    /// Someone else holds a valid Lease: wait.
    Wait,
}

/// Decides, purely, what to do with `lease` as `me` at `now`.
pub fn step(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    if spec.holder_identity.as_deref() == Some(me) || spec.holder_identity.is_none() {
        return Step::Take;
    }
    let duration = SignedDuration::from_secs(
        spec.lease_duration_seconds
            .map_or(LEASE_DURATION.as_secs() as i64, i64::from),
    );
    match &spec.renew_time {
        Some(MicroTime(renewed)) if *renewed + duration > now => Step::Wait,
        _ => Step::Take,
    }
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
}

impl Elector {
    /// Competes for the Lease `name` in `api`'s namespace as `me`.
    pub fn new(api: Api<Lease>, name: impl Into<String>, me: impl Into<String>) -> Self {
        Elector {
            api,
            name: name.into(),
            me: me.into(),
        }
    }

    /// Tries once to hold the Lease; `Ok(true)` when we hold it now.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        match step(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.me,
            now,
        ) {
            Step::Wait => Ok(false),
            Step::Create => {
                let mut lease = Lease::default();
                lease.metadata.name = Some(self.name.clone());
                lease.spec = Some(self.spec(None, now));
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    // Another replica created it first.
                    Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Step::Take => {
                let mut lease = current.expect("Take implies a Lease");
                let previous = lease.spec.take();
                lease.spec = Some(self.spec(previous, now));
                // The resourceVersion makes this a compare-and-swap: if another replica
                // wrote the Lease since we read it, the write is refused with 409.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    fn spec(&self, previous: Option<LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let ours = previous
            .as_ref()
            .is_some_and(|p| p.holder_identity.as_deref() == Some(self.me.as_str()));
        let previous = previous.unwrap_or_default();
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: if ours {
                previous.acquire_time
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(previous.lease_transitions.unwrap_or(0) + i32::from(!ours)),
            ..Default::default()
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        info!(lease = %self.name, identity = %self.me, "waiting to become the leader");
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.me, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: cannot read or write the Lease"),
            }
            tokio::time::sleep(RENEW_PERIOD).await;
        }
    }

    /// Gives the Lease up, if this replica holds it, so that another one takes over at its
    /// next try instead of waiting for the Lease to expire. For a clean shutdown.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            // Someone else wrote it meanwhile: it is not ours to release any more.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            other => other.map(|_| info!(lease = %self.name, "released the Lease")),
        }
    }

    /// Renews the Lease until it is lost (another replica holds it, or it could not be
    /// renewed before expiring); then returns.
    pub async fn hold(&self) {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_PERIOD).await;
            match self.try_hold().await {
                Ok(true) => renewed = tokio::time::Instant::now(),
                Ok(false) => return warn!(lease = %self.name, "another replica holds the Lease"),
                Err(e) => warn!(error = %e, "leader election: renewing the Lease failed"),
            }
            if renewed.elapsed() >= LEASE_DURATION {
                return warn!(lease = %self.name, "the Lease expired before it could be renewed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_secs).unwrap())),
            ..Default::default()
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(step(None, "a", at(100)), Step::Create);
    }

    #[test]
    fn own_lease_is_renewed() {
        assert_eq!(step(Some(&lease("a", 95)), "a", at(100)), Step::Take);
    }

    #[test]
    fn a_valid_lease_of_another_replica_is_respected() {
        assert_eq!(step(Some(&lease("b", 90)), "a", at(100)), Step::Wait);
    }

    #[test]
    fn an_expired_lease_is_taken_over() {
        assert_eq!(step(Some(&lease("b", 80)), "a", at(100)), Step::Take);
        let never_renewed = LeaseSpec {
            holder_identity: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(step(Some(&never_renewed), "a", at(100)), Step::Take);
    }
}
