//! Who is calling, and may they read this namespace's snapshots: the checks the
//! KEP asks of a SnapshotMetadata server, made against the real API server.
//!
//! * The token must authenticate (TokenReview) *for this service's audience*: a
//!   token issued for anything else (the API server itself, another service) is
//!   refused, so a token leaked from elsewhere is useless here. Otherwise
//!   UNAUTHENTICATED.
//! * The user it names must be allowed to `get` `volumesnapshots.snapshot.storage.k8s.io`
//!   in the request's namespace (SubjectAccessReview with the user's groups, uid and
//!   extra). Otherwise PERMISSION_DENIED.
//!
//! An API server that cannot be asked is UNAVAILABLE: the client may retry; nothing
//! is served on a review that did not happen.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::kube_api::{KubeApi, KubeError};

/// The user a token authenticated as.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Review<S> {
    api_version: &'static str,
    kind: &'static str,
    spec: S,
}

#[derive(Serialize)]
struct TokenReviewSpec<'a> {
    token: &'a str,
    audiences: [&'a str; 1],
}

#[derive(Deserialize)]
struct Reviewed<S> {
    #[serde(default = "Option::default")]
    status: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TokenReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: UserInfo,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AccessReviewSpec<'a> {
    user: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    uid: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra: &'a BTreeMap<String, Vec<String>>,
    resource_attributes: ResourceAttributes<'a>,
}

#[derive(Serialize)]
struct ResourceAttributes<'a> {
    namespace: &'a str,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
}

#[derive(Deserialize, Default)]
struct AccessReviewStatus {
    #[serde(default)]
    allowed: bool,
    #[serde(default)]
    reason: String,
}

/// Checks callers against one API server, for one audience.
#[derive(Debug, Clone)]
pub struct Access {
    api: KubeApi,
    audience: String,
}

fn unavailable(e: KubeError) -> Status {
    tracing::warn!(error = %tessera_telemetry::error_chain(&e), "SnapshotMetadata: the API server could not review a call");
    Status::unavailable(format!(
        "cannot review the call with the Kubernetes API: {}",
        tessera_telemetry::error_chain(&e)
    ))
}

impl Access {
    /// Tokens must be issued for `audience`.
    pub fn new(api: KubeApi, audience: impl Into<String>) -> Access {
        Access {
            api,
            audience: audience.into(),
        }
    }

    /// The API server this checks against (the snapshot lookups use it too).
    pub fn api(&self) -> &KubeApi {
        &self.api
    }

    /// Authenticates `token` and authorizes its user to read snapshots in
    /// `namespace`.
    pub async fn check(&self, token: &str, namespace: &str) -> Result<UserInfo, Status> {
        if token.is_empty() {
            return Err(Status::unauthenticated("security_token is required"));
        }
        let reviewed: Reviewed<TokenReviewStatus> = self
            .api
            .post(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                &Review {
                    api_version: "authentication.k8s.io/v1",
                    kind: "TokenReview",
                    spec: TokenReviewSpec {
                        token,
                        audiences: [&self.audience],
                    },
                },
            )
            .await
            .map_err(unavailable)?;
        let status = reviewed.status.unwrap_or_default();
        // The API server answers with the audiences the token is valid for among
        // those asked; an empty list with authenticated=true would mean it ignored
        // the audience, which must not pass either.
        if !status.authenticated || !status.audiences.contains(&self.audience) {
            let why = if status.error.is_empty() {
                format!("not valid for the audience {:?}", self.audience)
            } else {
                status.error
            };
            return Err(Status::unauthenticated(format!(
                "security_token rejected: {why}"
            )));
        }
        let user = status.user;
        let reviewed: Reviewed<AccessReviewStatus> = self
            .api
            .post(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                &Review {
                    api_version: "authorization.k8s.io/v1",
                    kind: "SubjectAccessReview",
                    spec: AccessReviewSpec {
                        user: &user.username,
                        uid: &user.uid,
                        groups: &user.groups,
                        extra: &user.extra,
                        resource_attributes: ResourceAttributes {
                            namespace,
                            verb: "get",
                            group: "snapshot.storage.k8s.io",
                            resource: "volumesnapshots",
                        },
                    },
                },
            )
            .await
            .map_err(unavailable)?;
        let status = reviewed.status.unwrap_or_default();
        if !status.allowed {
            return Err(Status::permission_denied(format!(
                "{} may not get volumesnapshots in namespace {namespace:?}{}",
                user.username,
                if status.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", status.reason)
                }
            )));
        }
        Ok(user)
    }
}
