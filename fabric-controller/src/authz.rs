//! Who may call what on the controller (issue 16, first part: identities; roles and projects
//! come next). Deny by default: a service or caller not named here is refused.
//!
//! - local-root (root on the Unix socket): everything.
//! - a user (a certificate `user/NAME`): Compute and Images, health and reflection.
//! - a host (`host/NAME`): HostLink, as itself only (the handlers check the host named in
//!   the request is the one in the certificate), and Images.PullImage; health.
//! - the controller's own identity: health only.
//! - anonymous (a TLS caller without a client certificate): HostLink.JoinHost only, where
//!   it presents a join token; everything else UNAUTHENTICATED.
//!
//! Join tokens (Compute.CreateJoinToken, ListJoinTokens) are an admin's: users and
//! local-root for now (see [`MAY_MAKE_JOIN_TOKENS`]).

use fabric_proto::tls::Identity;
use tonic::Status;

const HEALTH: &str = "grpc.health.v1.Health";

fn is_reflection(service: &str) -> bool {
    service.starts_with("grpc.reflection.")
}

/// The one method served to a caller without a client certificate.
pub const JOIN_METHOD: &str = "JoinHost";

/// Who may make and list join tokens, besides local-root: until roles exist, every user.
/// (Roles narrow this to `admin`.)
pub const MAY_MAKE_JOIN_TOKENS: fn(&Identity) -> bool =
    |caller| matches!(caller, Identity::User(_));

/// The policy of [`fabric_proto::tls::AuthorizeLayer`] for the controller's server.
pub fn controller_policy(path: &str, caller: &Identity) -> Result<(), String> {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let common = service == HEALTH || is_reflection(service);
    match caller {
        Identity::LocalRoot => Ok(()),
        Identity::Anonymous => match (service, method) {
            (fabric_proto::HOST_LINK_SERVICE, JOIN_METHOD) => Ok(()),
            _ => Err("only HostLink/JoinHost is served without a client certificate".into()),
        },
        Identity::User(_) => match (service, method) {
            // Join tokens: an admin's call.
            (fabric_proto::COMPUTE_SERVICE, "CreateJoinToken" | "ListJoinTokens") => {
                if MAY_MAKE_JOIN_TOKENS(caller) {
                    Ok(())
                } else {
                    Err("join tokens are made by admins".into())
                }
            }
            // Until roles exist, one user must not undo another's revocation: root only.
            (fabric_proto::COMPUTE_SERVICE, "RevokeHost" | "ReinstateHost") => {
                Err("revoking and reinstating hosts is root's, on the Unix socket".into())
            }
            (fabric_proto::COMPUTE_SERVICE | fabric_proto::IMAGES_SERVICE, _) => Ok(()),
            _ if common => Ok(()),
            _ => Err("users call Compute and Images".into()),
        },
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

    #[test]
    fn deny_by_default() {
        let user = Identity::User("ops".into());
        let host = Identity::Host("h1".into());
        let allowed = [
            ("/fabric.v1.Compute/CreateVm", &user),
            ("/fabric.v1.Images/PushImage", &user),
            ("/grpc.health.v1.Health/Check", &user),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &user,
            ),
            ("/fabric.v1.HostLink/Heartbeat", &host),
            ("/fabric.v1.Images/PullImage", &host),
            ("/fabric.v1.HostLink/Heartbeat", &Identity::LocalRoot),
        ];
        for (path, who) in allowed {
            assert_eq!(controller_policy(path, who), Ok(()), "{path} {who}");
        }
        let refused = [
            ("/fabric.v1.HostLink/RegisterHost", &user),
            ("/fabric.v1.Compute/CreateVm", &host),
            ("/fabric.v1.Images/PushImage", &host),
            ("/fabric.v1.Images/DeleteImage", &host),
            ("/fabric.v1.Agent/ListLocalVms", &user),
            ("/fabric.v1.Compute/CreateVm", &Identity::Controller),
            ("/fabric.v1.Compute/RevokeHost", &user),
            ("/fabric.v1.Compute/ReinstateHost", &user),
            ("", &user),
            ("/", &host),
        ];
        for (path, who) in refused {
            assert!(controller_policy(path, who).is_err(), "{path} {who}");
        }
    }

    #[test]
    fn a_caller_without_a_certificate_may_only_join() {
        let anonymous = Identity::Anonymous;
        assert_eq!(
            controller_policy("/fabric.v1.HostLink/JoinHost", &anonymous),
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
            assert!(controller_policy(path, &anonymous).is_err(), "{path}");
        }
        // Hosts renew; users and root make tokens; a host may not make one.
        let host = Identity::Host("h1".into());
        assert_eq!(
            controller_policy("/fabric.v1.HostLink/RenewCertificate", &host),
            Ok(())
        );
        for who in [&Identity::User("ops".into()), &Identity::LocalRoot] {
            for method in ["CreateJoinToken", "ListJoinTokens"] {
                assert_eq!(
                    controller_policy(&format!("/fabric.v1.Compute/{method}"), who),
                    Ok(())
                );
            }
        }
        assert!(controller_policy("/fabric.v1.Compute/CreateJoinToken", &host).is_err());
        assert!(check_host(&anonymous, "h1").is_err());
    }
}
