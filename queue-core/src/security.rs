//! Actors, policies and the permission checks of publishing and of reading a queue's
//! counts (docs/security.md).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{Error, Result};

/// The action checked first on every publish (no resource).
pub const ACTION_PUBLISH: &str = "queue.publish";
/// The action checked second, with the queue id as the resource.
pub const ACTION_PUBLISH_QUEUE: &str = "queue.publish.queue";
/// The action checked before reading a queue's counts, with the queue id as the resource.
pub const ACTION_INFO: &str = "queue.info";

/// Who is acting: an id and free-form metadata that policy conditions match on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Actor {
    /// The actor's id.
    pub id: String,
    /// Metadata (`role = "worker"`, ...).
    pub meta: BTreeMap<String, String>,
}

impl Actor {
    /// An actor without metadata.
    pub fn new(id: impl Into<String>) -> Self {
        Actor {
            id: id.into(),
            meta: BTreeMap::new(),
        }
    }

    /// Adds one metadata entry.
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }
}

/// What a policy says about one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The policy allows it.
    Allow,
    /// The policy forbids it; a deny always wins.
    Deny,
    /// The policy does not speak to it.
    Undecided,
}

/// A security policy. The YAML rules are [`RulePolicy`]; users can supply their own.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Decides one action for one actor; `resource` is `None` for the general check.
    fn evaluate(&self, actor: &Actor, action: &str, resource: Option<&str>) -> Decision;
}

/// A pattern: `*`, an exact string, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Matches everything.
    Any,
    /// Matches this string only.
    Exact(String),
    /// Matches strings starting with this prefix.
    Prefix(String),
}

impl Pattern {
    /// Parses `*`, `prefix*` or an exact string.
    pub fn parse(text: &str) -> Pattern {
        if text == "*" {
            Pattern::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_string())
        } else {
            Pattern::Exact(text.to_string())
        }
    }

    /// Whether the pattern matches.
    pub fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => s == text,
            Pattern::Prefix(p) => text.starts_with(p.as_str()),
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Allow what matches.
    Allow,
    /// Deny what matches.
    Deny,
}

/// A rule: actions, resources, an effect and conditions on the actor's metadata.
///
/// A check without a resource (the general `queue.publish`) is matched by an allowing
/// rule whatever its resources, and by a denying rule only when its resources match
/// everything (`*`): a rule that denies some queues never denies publishing in general.
///
/// ```
/// use queue_core::security::{Actor, Decision, Effect, Policy, RulePolicy};
/// let rule = RulePolicy::new(["queue.*"], ["app:*"], Effect::Allow);
/// let actor = Actor::new("worker");
/// assert_eq!(rule.evaluate(&actor, "queue.publish", None), Decision::Allow);
/// assert_eq!(rule.evaluate(&actor, "queue.publish.queue", Some("app:tasks")), Decision::Allow);
/// assert_eq!(rule.evaluate(&actor, "queue.publish.queue", Some("billing:x")), Decision::Undecided);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePolicy {
    /// Action patterns.
    pub actions: Vec<Pattern>,
    /// Resource patterns.
    pub resources: Vec<Pattern>,
    /// Allow or deny.
    pub effect: Effect,
    /// Actor metadata that must all match.
    pub conditions: BTreeMap<String, String>,
}

impl RulePolicy {
    /// A rule without conditions.
    pub fn new<'a>(
        actions: impl IntoIterator<Item = &'a str>,
        resources: impl IntoIterator<Item = &'a str>,
        effect: Effect,
    ) -> Self {
        RulePolicy {
            actions: actions.into_iter().map(Pattern::parse).collect(),
            resources: resources.into_iter().map(Pattern::parse).collect(),
            effect,
            conditions: BTreeMap::new(),
        }
    }

    /// Adds a condition on the actor's metadata.
    pub fn with_condition(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.conditions.insert(key.into(), value.into());
        self
    }
}

impl Policy for RulePolicy {
    fn evaluate(&self, actor: &Actor, action: &str, resource: Option<&str>) -> Decision {
        if !self.actions.iter().any(|p| p.matches(action)) {
            return Decision::Undecided;
        }
        let resource_matches = match resource {
            Some(r) => self.resources.iter().any(|p| p.matches(r)),
            None => match self.effect {
                Effect::Allow => true,
                Effect::Deny => self.resources.contains(&Pattern::Any),
            },
        };
        if !resource_matches {
            return Decision::Undecided;
        }
        let conditions_hold = self
            .conditions
            .iter()
            .all(|(k, v)| actor.meta.get(k) == Some(v));
        if !conditions_hold {
            return Decision::Undecided;
        }
        match self.effect {
            Effect::Allow => Decision::Allow,
            Effect::Deny => Decision::Deny,
        }
    }
}

/// The security in effect where code runs: an actor, the policies that apply, and
/// whether strict mode is on.
///
/// With policies, only what they allow is allowed (undecided is denied) and a deny wins.
/// Without an actor or without policies, everything is allowed unless strict mode is on.
///
/// ```
/// use std::sync::Arc;
/// use queue_core::security::{Actor, Effect, RulePolicy, SecurityContext};
/// let open = SecurityContext::default();
/// assert!(open.check("queue.publish", None).is_ok());
/// let ctx = SecurityContext::new(Some(Actor::new("w")), vec![
///     Arc::new(RulePolicy::new(["queue.publish"], ["*"], Effect::Allow)),
/// ], false);
/// assert!(ctx.check("queue.publish", None).is_ok());
/// assert!(ctx.check("queue.publish.queue", Some("app:tasks")).is_err());
/// ```
#[derive(Debug, Clone, Default)]
pub struct SecurityContext {
    actor: Option<Actor>,
    policies: Vec<Arc<dyn Policy>>,
    strict: bool,
}

impl SecurityContext {
    /// A context with an actor, its policies and the strict-mode flag.
    pub fn new(actor: Option<Actor>, policies: Vec<Arc<dyn Policy>>, strict: bool) -> Self {
        SecurityContext {
            actor,
            policies,
            strict,
        }
    }

    /// No actor, no policies; strict mode as given.
    pub fn unrestricted(strict: bool) -> Self {
        SecurityContext::new(None, Vec::new(), strict)
    }

    /// The actor, if any.
    pub fn actor(&self) -> Option<&Actor> {
        self.actor.as_ref()
    }

    /// Whether strict mode is on.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// The policies, in the order they are checked.
    pub fn policies(&self) -> &[Arc<dyn Policy>] {
        &self.policies
    }

    /// Decides one action: `Ok(())` or `PERMISSION_DENIED` naming action, resource and actor.
    pub fn check(&self, action: &str, resource: Option<&str>) -> Result<()> {
        let anonymous = Actor::default();
        let actor = self.actor.as_ref().unwrap_or(&anonymous);
        let allowed = if self.policies.is_empty() || self.actor.is_none() {
            !self.strict
        } else {
            let mut allowed = false;
            for policy in &self.policies {
                match policy.evaluate(actor, action, resource) {
                    Decision::Deny => {
                        allowed = false;
                        break;
                    }
                    Decision::Allow => allowed = true,
                    Decision::Undecided => {}
                }
            }
            allowed
        };
        if allowed {
            return Ok(());
        }
        let on = resource.map(|r| format!(" on {r:?}")).unwrap_or_default();
        let who = if actor.id.is_empty() {
            "anonymous actor".to_string()
        } else {
            format!("actor {:?}", actor.id)
        };
        let why = if self.policies.is_empty() || self.actor.is_none() {
            " (strict mode: no policy allows it)"
        } else {
            ""
        };
        Err(
            Error::permission_denied(format!("{who} may not {action}{on}{why}"))
                .with_detail("action", action)
                .with_detail("resource", resource.unwrap_or("")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn ctx(rules: Vec<RulePolicy>) -> SecurityContext {
        SecurityContext::new(
            Some(Actor::new("w").with_meta("role", "worker")),
            rules
                .into_iter()
                .map(|r| Arc::new(r) as Arc<dyn Policy>)
                .collect(),
            false,
        )
    }

    #[test]
    fn patterns() {
        assert!(Pattern::parse("*").matches("anything"));
        assert!(Pattern::parse("app:*").matches("app:tasks"));
        assert!(!Pattern::parse("app:*").matches("billing:tasks"));
        assert!(Pattern::parse("app:tasks").matches("app:tasks"));
        assert!(!Pattern::parse("app:tasks").matches("app:tasks2"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let c = ctx(vec![
            RulePolicy::new(["queue.*"], ["*"], Effect::Allow),
            RulePolicy::new(["queue.publish.queue"], ["app:secret"], Effect::Deny),
        ]);
        assert!(c.check(ACTION_PUBLISH, None).is_ok());
        assert!(c.check(ACTION_PUBLISH_QUEUE, Some("app:tasks")).is_ok());
        let err = c
            .check(ACTION_PUBLISH_QUEUE, Some("app:secret"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert!(err.message().contains("app:secret"));
    }

    #[test]
    fn a_partial_deny_does_not_deny_the_general_check() {
        let c = ctx(vec![
            RulePolicy::new(["*"], ["*"], Effect::Allow),
            RulePolicy::new(["queue.*"], ["billing:*"], Effect::Deny),
        ]);
        assert!(c.check(ACTION_PUBLISH, None).is_ok());
        assert!(c.check(ACTION_PUBLISH_QUEUE, Some("billing:x")).is_err());
        let all = ctx(vec![
            RulePolicy::new(["*"], ["*"], Effect::Allow),
            RulePolicy::new(["queue.publish"], ["*"], Effect::Deny),
        ]);
        assert!(all.check(ACTION_PUBLISH, None).is_err());
    }

    #[test]
    fn undecided_is_denied_where_policies_apply() {
        let c = ctx(vec![RulePolicy::new(["other.*"], ["*"], Effect::Allow)]);
        assert!(c.check(ACTION_PUBLISH, None).is_err());
    }

    #[test]
    fn conditions_match_actor_meta() {
        let rule = RulePolicy::new(["*"], ["*"], Effect::Allow).with_condition("role", "worker");
        assert!(ctx(vec![rule.clone()]).check(ACTION_PUBLISH, None).is_ok());
        let other = rule.with_condition("team", "billing");
        assert!(ctx(vec![other]).check(ACTION_PUBLISH, None).is_err());
    }

    #[test]
    fn strict_mode_denies_without_policies() {
        assert!(
            SecurityContext::unrestricted(false)
                .check(ACTION_PUBLISH, None)
                .is_ok()
        );
        let err = SecurityContext::unrestricted(true)
            .check(ACTION_PUBLISH, None)
            .unwrap_err();
        assert!(err.message().contains("strict mode"));
    }
}
