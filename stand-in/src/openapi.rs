//! WeChat's quota management endpoints ("openApi 管理"), as the stand-in plays them over its
//! limits (`limits.rs`): quota/get, which reports an API's limits and today's use, and the
//! three `clear_quota` calls, which start an account's day over, ten times a month.
//!
//! Each is an API with its own limits like any other (counted under the account that calls
//! it, once its token or secret checks out). Errors WeChat documents without an order are
//! checked in the order written on each function.

use serde::Serialize;

use crate::answer::Answer;
use crate::limits::QuotaReport;
use crate::record::bump;
use crate::request::{Params, ReceivedCall, Route};
use crate::upstream::Shared;

/// quota/get's success body.
#[derive(Serialize)]
struct QuotaAnswer {
    errcode: i64,
    errmsg: &'static str,
    #[serde(flatten)]
    report: QuotaReport,
}

impl Shared {
    /// `POST /cgi-bin/openapi/quota/get?access_token=T` with `{"cgi_path": "/..."}`: 41001,
    /// 40001 or 42001 for the token (an account's own, or a platform's
    /// `authorizer_access_token` for it); 47001 without a `cgi_path`; the limits of
    /// quota/get itself; 76003 for a `cgi_path` not starting with `/`; 76022 for every
    /// `/sns/` API; 76021 for an API the stand-in does not know (neither one of its own
    /// endpoints nor named by its configuration). Figures it does not limit are reported as
    /// [`UNLIMITED_FIGURE`](crate::UNLIMITED_FIGURE).
    pub(crate) fn quota_get(
        &self,
        call: &ReceivedCall<'_>,
        params: &Params<'_>,
    ) -> Result<Answer, i64> {
        let caller = self.api_caller(params, call.at, false)?;
        let cgi_path = params.cgi_path.as_deref().ok_or(47001)?;
        let key = format!("{cgi_path} {}", caller.appid);
        bump(&self.counters.quota_queries, &key);
        self.admit(
            call,
            Route::QuotaGet,
            &caller.appid,
            caller.via_component,
            None,
        )?;
        if !cgi_path.starts_with('/') {
            return Err(76003);
        }
        if cgi_path.starts_with("/sns/") || cgi_path.contains("/sns/") {
            return Err(76022);
        }
        let route = Route::of(cgi_path);
        if !route.queryable() && !self.limits.names(cgi_path) {
            return Err(76021);
        }
        let report = self
            .limits
            .report(cgi_path, &caller.appid, route.default_limited(), call.at);
        let body = QuotaAnswer {
            errcode: 0,
            errmsg: "ok",
            report,
        };
        let body = serde_json::to_string(&body).expect("a quota answer serializes");
        Ok(Answer::success(body))
    }

    /// `POST /cgi-bin/clear_quota?access_token=T` with `{"appid"}`: the token as for
    /// quota/get; 41002 without `appid`; 40013 for an appid that is not the token's (the
    /// stand-in's choice); the limits of `clear_quota`; then 48006 past the month's clears.
    pub(crate) fn clear_quota(
        &self,
        call: &ReceivedCall<'_>,
        params: &Params<'_>,
    ) -> Result<Answer, i64> {
        let caller = self.api_caller(params, call.at, false)?;
        let appid = params.appid.as_deref().ok_or(41002)?;
        if appid != caller.appid {
            return Err(40013);
        }
        self.admit(call, Route::ClearQuota, appid, caller.via_component, None)?;
        self.limits.clear(appid, call.at)?;
        Ok(Answer::ok())
    }

    /// `POST /cgi-bin/clear_quota/v2` with `{"appid","appsecret"}`, for an account whose
    /// token calls are refused: 41002, 41004, 40013 (unknown appid), 40125 (wrong secret);
    /// the limits; then 48006 past the month's clears (shared with `clear_quota`).
    pub(crate) fn clear_quota_v2(
        &self,
        call: &ReceivedCall<'_>,
        params: &Params<'_>,
    ) -> Result<Answer, i64> {
        let appid = params.appid.as_deref().ok_or(41002)?;
        let secret = params.appsecret.as_deref().ok_or(41004)?;
        let app = self.apps.get(appid).ok_or(40013)?;
        if app.secret != secret {
            return Err(40125);
        }
        self.admit(call, Route::ClearQuotaV2, appid, false, None)?;
        self.limits.clear(appid, call.at)?;
        Ok(Answer::ok())
    }

    /// `POST /cgi-bin/component/clear_quota?component_access_token=T` with
    /// `{"component_appid"}`: the platform's own APIs' daily counts start over. 41021, 41002,
    /// 40001 (a token that is not this platform's, or an unknown platform); the limits; then
    /// 48006 past the platform's clears of the month.
    pub(crate) fn component_clear_quota(
        &self,
        call: &ReceivedCall<'_>,
        params: &Params<'_>,
    ) -> Result<Answer, i64> {
        let token = params.component_access_token.as_deref().ok_or(41021)?;
        let component_appid = params.component_appid.as_deref().ok_or(41002)?;
        self.platform(component_appid, token, call.at)
            .ok_or(40001)?;
        self.admit(
            call,
            Route::ComponentClearQuota,
            component_appid,
            false,
            None,
        )?;
        self.limits.clear(component_appid, call.at)?;
        Ok(Answer::ok())
    }
}
