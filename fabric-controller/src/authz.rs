//! Who may call what on the controller. Deny by default: a service, method or caller not
//! named here is refused.
//!
//! - local-root (root on the Unix socket): everything, as a cluster-wide admin.
//! - a user (a certificate `user/NAME`): what their role bindings allow ([`Grants`]), method by
//!   method as [`RULES`] says; a user with no binding calls nothing but health.
//! - a host (`host/NAME`): HostLink, as itself only (the handlers check the host named in
//!   the request is the one in the certificate), and Images.PullImage; health.
//! - the controller's own identity: health only.
//! - anonymous (a TLS caller without a client certificate): HostLink.JoinHost only, where
//!   it presents a join token; everything else UNAUTHENTICATED.
//!
//! Two levels: this layer decides whether the caller's roles allow the method at all (the
//! role it needs, and whether the binding must be cluster-wide); the Compute handlers then
//! decide per project ([`Grants::role_in`]): a project-scoped user sees only their projects'
//! VMs and events, and gets NOT_FOUND for another project's VM.

use std::collections::BTreeMap;

use fabric_proto::tls::Identity;
use fabric_proto::v1::Role;
use tonic::Status;

const HEALTH: &str = "grpc.health.v1.Health";

fn is_reflection(service: &str) -> bool {
    service.starts_with("grpc.reflection.")
}

/// The one method served to a caller without a client certificate.
pub const JOIN_METHOD: &str = "JoinHost";

/// Where a binding must hold for a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A binding in any project will do: the handler then limits the call to the caller's
    /// projects (VMs, events, quotas), or the objects are cluster-wide but harmless to read
    /// or add (hosts' state, images).
    AnyProject,
    /// Only a cluster-wide binding: the call changes what every project shares (hosts,
    /// identities, bindings, quotas) or reads what all projects did (the audit log).
    Cluster,
}

/// What a method needs: the least role, the scope, and whether it changes anything (the
/// audit log records every call that does, and every refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub role: Role,
    pub scope: Scope,
    pub mutates: bool,
}

const fn rule(role: Role, scope: Scope, mutates: bool) -> Rule {
    Rule {
        role,
        scope,
        mutates,
    }
}

const READ: Rule = rule(Role::Viewer, Scope::AnyProject, false);
const OPERATE: Rule = rule(Role::Operator, Scope::AnyProject, true);
const OPERATE_HOSTS: Rule = rule(Role::Operator, Scope::Cluster, true);
const ADMIN: Rule = rule(Role::Admin, Scope::Cluster, true);
const ADMIN_READ: Rule = rule(Role::Admin, Scope::Cluster, false);

/// Every method of the services users call, classified: (service, method, rule). A method
/// missing here is refused to every user, and `every_method_is_classified` fails.
pub const RULES: &[(&str, &str, Rule)] = &[
    (fabric_proto::COMPUTE_SERVICE, "CreateVm", OPERATE),
    (fabric_proto::COMPUTE_SERVICE, "GetVm", READ),
    (fabric_proto::COMPUTE_SERVICE, "ListVms", READ),
    (fabric_proto::COMPUTE_SERVICE, "DeleteVm", OPERATE),
    (fabric_proto::COMPUTE_SERVICE, "StartVm", OPERATE),
    (fabric_proto::COMPUTE_SERVICE, "StopVm", OPERATE),
    (fabric_proto::COMPUTE_SERVICE, "ListHosts", READ),
    (fabric_proto::COMPUTE_SERVICE, "GetHost", READ),
    (fabric_proto::COMPUTE_SERVICE, "CordonHost", OPERATE_HOSTS),
    (fabric_proto::COMPUTE_SERVICE, "UncordonHost", OPERATE_HOSTS),
    (fabric_proto::COMPUTE_SERVICE, "DrainHost", OPERATE_HOSTS),
    (fabric_proto::COMPUTE_SERVICE, "RemoveHost", ADMIN),
    (fabric_proto::COMPUTE_SERVICE, "RevokeHost", ADMIN),
    (fabric_proto::COMPUTE_SERVICE, "ReinstateHost", ADMIN),
    (fabric_proto::COMPUTE_SERVICE, "WatchEvents", READ),
    (fabric_proto::COMPUTE_SERVICE, "BindRole", ADMIN),
    (fabric_proto::COMPUTE_SERVICE, "UnbindRole", ADMIN),
    (
        fabric_proto::COMPUTE_SERVICE,
        "ListRoleBindings",
        ADMIN_READ,
    ),
    (fabric_proto::COMPUTE_SERVICE, "SetQuota", ADMIN),
    (fabric_proto::COMPUTE_SERVICE, "GetQuota", READ),
    (fabric_proto::COMPUTE_SERVICE, "ListAudit", ADMIN_READ),
    // Join tokens make host identities: a cluster-wide admin's.
    (fabric_proto::COMPUTE_SERVICE, "CreateJoinToken", ADMIN),
    (fabric_proto::COMPUTE_SERVICE, "ListJoinTokens", ADMIN_READ),
    // Images: any bound user lists and pulls them; an operator of some project may push, and
    // the Images handler then allows only a new image or one its project owns (cluster-wide
    // ones: cluster-wide operators); only a cluster-wide admin deletes.
    (fabric_proto::IMAGES_SERVICE, "PushImage", OPERATE),
    (fabric_proto::IMAGES_SERVICE, "ListImages", READ),
    (fabric_proto::IMAGES_SERVICE, "PullImage", READ),
    (fabric_proto::IMAGES_SERVICE, "DeleteImage", ADMIN),
];

/// The rule of `/service/method`, if it is one users may be granted.
pub fn rule_of(path: &str) -> Option<Rule> {
    let (service, method) = split(path);
    RULES
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map(|(_, _, r)| *r)
}

fn split(path: &str) -> (&str, &str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}

/// The name of a role as bindings and the CLI spell it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Operator => "operator",
        Role::Viewer => "viewer",
        Role::Unspecified => "none",
    }
}

/// A role from its name.
pub fn parse_role(name: &str) -> Result<Role, String> {
    match name {
        "admin" => Ok(Role::Admin),
        "operator" => Ok(Role::Operator),
        "viewer" => Ok(Role::Viewer),
        other => Err(format!("role {other:?}: one of admin, operator, viewer")),
    }
}

/// The project a VM without one belongs to.
pub const DEFAULT_PROJECT: &str = "default";

/// A project name as given (empty: [`DEFAULT_PROJECT`]), checked like every name.
pub fn project_or_default(project: &str) -> Result<String, String> {
    if project.is_empty() {
        return Ok(DEFAULT_PROJECT.to_string());
    }
    fabric_proto::tls::check_name("project", project)?;
    Ok(project.to_string())
}

/// What one caller may do: its highest role cluster-wide and in each project.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub cluster: Option<Role>,
    pub projects: BTreeMap<String, Role>,
}

impl Grants {
    pub fn admin() -> Grants {
        Grants {
            cluster: Some(Role::Admin),
            projects: BTreeMap::new(),
        }
    }

    /// Adds a binding (`project` None: cluster-wide); the highest role of a scope counts.
    pub fn add(&mut self, project: Option<&str>, role: Role) {
        let slot = match project {
            None => &mut self.cluster,
            Some(p) => {
                let current = self.projects.get(p).copied();
                let best = current.into_iter().chain([role]).max().unwrap_or(role);
                self.projects.insert(p.to_string(), best);
                return;
            }
        };
        *slot = Some(slot.map_or(role, |r| r.max(role)));
    }

    /// The caller's role in `project`: the higher of its cluster-wide one and its own there.
    pub fn role_in(&self, project: &str) -> Option<Role> {
        self.cluster.max(self.projects.get(project).copied())
    }

    /// Whether the caller holds at least `role` in `project`.
    pub fn can(&self, role: Role, project: &str) -> bool {
        self.role_in(project).is_some_and(|r| r >= role)
    }

    /// Whether the caller holds at least `role` cluster-wide (so in every project).
    pub fn everywhere(&self, role: Role) -> bool {
        self.cluster.is_some_and(|r| r >= role)
    }

    /// Whether the rule lets the caller call the method at all.
    pub fn allows(&self, rule: Rule) -> bool {
        match rule.scope {
            Scope::Cluster => self.everywhere(rule.role),
            Scope::AnyProject => {
                self.everywhere(rule.role) || self.projects.values().any(|r| *r >= rule.role)
            }
        }
    }

    /// The bindings as the audit log shows them: "admin", "operator@p1".
    pub fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self.cluster.iter().map(|r| role_name(*r).into()).collect();
        out.extend(
            self.projects
                .iter()
                .map(|(p, r)| format!("{}@{p}", role_name(*r))),
        );
        out
    }
}

/// The policy of [`fabric_proto::tls::AuthorizeLayer`] for the controller's server, given
/// the grants of a user caller (ignored for other identities).
pub fn controller_policy(path: &str, caller: &Identity, grants: &Grants) -> Result<(), String> {
    let (service, method) = split(path);
    match caller {
        Identity::LocalRoot => Ok(()),
        Identity::Anonymous => match (service, method) {
            (fabric_proto::HOST_LINK_SERVICE, JOIN_METHOD) => Ok(()),
            _ => Err("only HostLink/JoinHost is served without a client certificate".into()),
        },
        Identity::User(_) => {
            if service == HEALTH {
                return Ok(());
            }
            if is_reflection(service) {
                return match grants.cluster.is_some() || !grants.projects.is_empty() {
                    true => Ok(()),
                    false => Err("the user has no role binding".into()),
                };
            }
            let Some(rule) = rule_of(path) else {
                return Err("users call Compute and Images".into());
            };
            if grants.allows(rule) {
                return Ok(());
            }
            let roles = grants.describe();
            let held = if roles.is_empty() {
                "no role binding".to_string()
            } else {
                format!("roles {}", roles.join(", "))
            };
            Err(format!(
                "{method} needs role {} {}; the user has {held}",
                role_name(rule.role),
                match rule.scope {
                    Scope::Cluster => "bound cluster-wide",
                    Scope::AnyProject => "(in some project)",
                }
            ))
        }
        Identity::Host(_) => match (service, method) {
            (fabric_proto::HOST_LINK_SERVICE, _) | (fabric_proto::IMAGES_SERVICE, "PullImage") => {
                Ok(())
            }
            _ if service == HEALTH => Ok(()),
            _ => Err("hosts call HostLink and pull images".into()),
        },
        Identity::Controller => match service {
            HEALTH => Ok(()),
            _ => Err("the controller's certificate is not a client's".into()),
        },
    }
}

/// For a HostLink call about host `name` (the name it registers, or the name of the host
/// record its host id names): PERMISSION_DENIED unless the caller is that host (or
/// local-root). The refusal names both, for the audit trail in the log.
pub fn check_host(caller: &Identity, name: &str) -> Result<(), Status> {
    match caller {
        Identity::LocalRoot => Ok(()),
        Identity::Host(own) if own == name => Ok(()),
        other => {
            tracing::warn!(caller = %other, host = name, "a HostLink call for another host refused");
            Err(Status::permission_denied(format!(
                "{other} may not act as host {name:?}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn grants(bindings: &[(Option<&str>, Role)]) -> Grants {
        let mut g = Grants::default();
        for (project, role) in bindings {
            g.add(*project, *role);
        }
        g
    }

    #[test]
    fn deny_by_default() {
        let user = Identity::User("ops".into());
        let host = Identity::Host("h1".into());
        let operator = grants(&[(None, Role::Operator)]);
        let none = Grants::default();
        let allowed = [
            ("/fabric.v1.Compute/CreateVm", &user, &operator),
            ("/fabric.v1.Images/PushImage", &user, &operator),
            ("/fabric.v1.Compute/DrainHost", &user, &operator),
            ("/grpc.health.v1.Health/Check", &user, &none),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &user,
                &operator,
            ),
            ("/fabric.v1.HostLink/Heartbeat", &host, &none),
            ("/fabric.v1.Images/PullImage", &host, &none),
            ("/fabric.v1.HostLink/Heartbeat", &Identity::LocalRoot, &none),
            ("/fabric.v1.Compute/BindRole", &Identity::LocalRoot, &none),
        ];
        for (path, who, g) in allowed {
            assert_eq!(controller_policy(path, who, g), Ok(()), "{path} {who}");
        }
        let refused = [
            ("/fabric.v1.HostLink/RegisterHost", &user, &operator),
            ("/fabric.v1.Compute/CreateVm", &host, &none),
            ("/fabric.v1.Images/PushImage", &host, &none),
            ("/fabric.v1.Images/DeleteImage", &host, &none),
            ("/fabric.v1.Agent/ListLocalVms", &user, &operator),
            ("/fabric.v1.Compute/CreateVm", &Identity::Controller, &none),
            ("/fabric.v1.Compute/RevokeHost", &user, &operator),
            ("/fabric.v1.Compute/ReinstateHost", &user, &operator),
            ("/fabric.v1.Compute/BindRole", &user, &operator),
            ("/fabric.v1.Compute/ListAudit", &user, &operator),
            ("/fabric.v1.Compute/ListVms", &user, &none),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &user,
                &none,
            ),
            ("/fabric.v1.Compute/NoSuchMethod", &user, &operator),
            ("", &user, &operator),
            ("/", &host, &none),
        ];
        for (path, who, g) in refused {
            assert!(controller_policy(path, who, g).is_err(), "{path} {who}");
        }
    }

    /// Every method of every service a user may call is in RULES, and RULES names no method
    /// the services lack: a new RPC without a classification fails here.
    #[test]
    fn every_method_is_classified() {
        let set = prost_types::FileDescriptorSet::decode(fabric_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut seen = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                if full != fabric_proto::COMPUTE_SERVICE && full != fabric_proto::IMAGES_SERVICE {
                    continue;
                }
                for method in &service.method {
                    let path = format!("/{full}/{}", method.name());
                    assert!(
                        rule_of(&path).is_some(),
                        "{path} has no rule in authz::RULES"
                    );
                    seen.push(path);
                }
            }
        }
        assert!(
            seen.len() >= 25,
            "only {} methods found: {seen:?}",
            seen.len()
        );
        for (service, method, _) in RULES {
            let path = format!("/{service}/{method}");
            assert!(
                seen.contains(&path),
                "RULES names {path}, which no service has"
            );
        }
    }

    #[test]
    fn read_methods_mutate_nothing_and_viewers_mutate_nothing() {
        let viewer = grants(&[(None, Role::Viewer)]);
        for (service, method, rule) in RULES {
            let path = format!("/{service}/{method}");
            let verdict = controller_policy(&path, &Identity::User("v".into()), &viewer);
            if rule.mutates {
                assert!(verdict.is_err(), "a viewer may call {path}");
                assert!(rule.role >= Role::Operator, "{path}");
            }
            if rule.role == Role::Viewer {
                assert_eq!(verdict, Ok(()), "{path}");
            }
        }
    }

    #[test]
    fn bindings_resolve_cluster_wide_and_per_project() {
        type Case<'a> = (&'a [(Option<&'a str>, Role)], &'a str, Option<Role>);
        let cases: &[Case] = &[
            (&[], "p1", None),
            (&[(None, Role::Viewer)], "p1", Some(Role::Viewer)),
            (&[(Some("p1"), Role::Operator)], "p1", Some(Role::Operator)),
            (&[(Some("p1"), Role::Operator)], "p2", None),
            (
                &[(None, Role::Viewer), (Some("p1"), Role::Operator)],
                "p1",
                Some(Role::Operator),
            ),
            (
                &[(None, Role::Viewer), (Some("p1"), Role::Operator)],
                "p2",
                Some(Role::Viewer),
            ),
            (
                &[(None, Role::Admin), (Some("p1"), Role::Viewer)],
                "p1",
                Some(Role::Admin),
            ),
            (
                &[(Some("p1"), Role::Viewer), (Some("p1"), Role::Operator)],
                "p1",
                Some(Role::Operator),
            ),
        ];
        for (bindings, project, want) in cases {
            assert_eq!(
                grants(bindings).role_in(project),
                *want,
                "{bindings:?} in {project}"
            );
        }
        // A project admin is no cluster admin: cluster-scoped methods stay closed.
        let project_admin = grants(&[(Some("p1"), Role::Admin)]);
        assert!(project_admin.allows(READ));
        assert!(project_admin.allows(OPERATE));
        assert!(!project_admin.allows(OPERATE_HOSTS));
        assert!(!project_admin.allows(ADMIN));
        assert!(project_admin.can(Role::Operator, "p1"));
        assert!(!project_admin.can(Role::Viewer, "p2"));
        assert_eq!(
            grants(&[(None, Role::Viewer), (Some("p1"), Role::Operator)]).describe(),
            vec!["viewer".to_string(), "operator@p1".to_string()]
        );
    }

    #[test]
    fn project_names() {
        assert_eq!(project_or_default("").as_deref(), Ok("default"));
        assert_eq!(project_or_default("p-1").as_deref(), Ok("p-1"));
        for bad in ["P1", "a/b", "*", "-x", &"x".repeat(64)] {
            assert!(project_or_default(bad).is_err(), "{bad}");
        }
        assert!(parse_role("root").is_err());
    }

    #[test]
    fn a_caller_without_a_certificate_may_only_join() {
        let anonymous = Identity::Anonymous;
        let none = Grants::default();
        assert_eq!(
            controller_policy("/fabric.v1.HostLink/JoinHost", &anonymous, &none),
            Ok(())
        );
        for path in [
            "/fabric.v1.HostLink/RegisterHost",
            "/fabric.v1.HostLink/Heartbeat",
            "/fabric.v1.HostLink/WatchAssignments",
            "/fabric.v1.HostLink/RenewCertificate",
            "/fabric.v1.HostLink/JoinHostX",
            "/fabric.v1.Compute/CreateJoinToken",
            "/fabric.v1.Compute/ListVms",
            "/fabric.v1.Images/PullImage",
            "/fabric.v1.Agent/ListLocalVms",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/fabric.v1.Compute/JoinHost",
            "",
            "/",
        ] {
            assert!(
                controller_policy(path, &anonymous, &none).is_err(),
                "{path}"
            );
        }
        // Hosts renew; admins and root make tokens; operators and hosts do not.
        let host = Identity::Host("h1".into());
        assert_eq!(
            controller_policy("/fabric.v1.HostLink/RenewCertificate", &host, &none),
            Ok(())
        );
        let ops = Identity::User("ops".into());
        let mut operator = Grants::default();
        operator.add(None, Role::Operator);
        for method in ["CreateJoinToken", "ListJoinTokens"] {
            let path = format!("/fabric.v1.Compute/{method}");
            assert_eq!(controller_policy(&path, &ops, &Grants::admin()), Ok(()));
            assert_eq!(
                controller_policy(&path, &Identity::LocalRoot, &none),
                Ok(())
            );
            assert!(controller_policy(&path, &ops, &operator).is_err());
            assert!(controller_policy(&path, &host, &none).is_err());
        }
        assert!(check_host(&anonymous, "h1").is_err());
    }
}
