//! Admitting an `llm` request (SPEC §7 "Requests", "Reservations"): a key's `models` allow-list
//! (OpenRouter's fallback `models` entry by entry; a WebSocket handshake's `model` parameter),
//! the limit fields, and a reservation against the key's and the gateway's budgets — all before
//! anything is forwarded. Where an allow-list or a budget applies, a body the gateway cannot read
//! is 400: it cannot meter what it cannot read.

use std::sync::Arc;

use bytes::Bytes;

use super::budget::{Amount, Applies, Book, Refusal, Reservation};
use super::meter::Meter;
use super::request::{self, ModelPattern};
use crate::error::GatewayError;
use crate::live::Live;

/// One request's admission: the config it runs under, the budget book, and its key.
pub struct Admission<'a> {
    pub live: &'a Live,
    pub book: Option<&'a Arc<Book>>,
    pub key_index: Option<usize>,
    /// The key's user (its `user_header`), held to the key's `user_budget`.
    pub user: Option<&'a str>,
    /// A JWT identity (`<issuer>:<sub>`) and its issuer's per-subject caps, where there is no key.
    pub subject: Option<(&'a str, Arc<[super::budget::Cap]>)>,
    /// The client speaks Anthropic's Messages API (it sent `anthropic-version`): its requests
    /// are never given OpenAI's `stream_options`.
    pub anthropic: bool,
}

impl Admission<'_> {
    fn allowed(&self) -> Option<&[ModelPattern]> {
        let cfg = &self.live.config;
        self.key_index.and_then(|k| cfg.keys[k].models.as_deref())
    }

    /// Whether any cap applies to this request (its key's, or the gateway's).
    fn budgeted(&self) -> bool {
        let cfg = &self.live.config;
        self.book.is_some()
            && (!cfg.budgets.is_empty()
                || self.key_index.is_some_and(|k| {
                    !cfg.keys[k].budget.is_empty()
                        || (self.user.is_some() && !cfg.keys[k].user_budget.is_empty())
                })
                || self
                    .subject
                    .as_ref()
                    .is_some_and(|(_, caps)| !caps.is_empty()))
    }

    fn default_completion(&self) -> u64 {
        self.live
            .config
            .usage
            .as_ref()
            .map_or(super::DEFAULT_COMPLETION_RESERVATION, |u| {
                u.default_completion_reservation
            })
    }

    /// A WebSocket handshake (a realtime session): its model is the `model` query parameter; it
    /// reserves `default_completion_reservation`.
    pub async fn handshake(
        &self,
        meter: &mut Meter,
        query: Option<&str>,
    ) -> Result<(), GatewayError> {
        meter.model = request::model_from_query(query)?;
        if let Some(allowed) = self.allowed()
            && !meter
                .model
                .as_deref()
                .is_some_and(|m| allowed.iter().any(|p| p.matches(m)))
        {
            return Err(GatewayError::ModelNotAllowed);
        }
        let own = self.estimate(
            meter.model.as_deref(),
            0,
            Some(self.default_completion()),
            1,
        );
        self.reserve(meter, own).await?;
        meter.admitted = true;
        Ok(())
    }

    /// A request without a body (a GET of the model list): nothing to read, nothing reserved;
    /// still refused once a cap is spent.
    pub async fn bodiless(&self, meter: &mut Meter) -> Result<(), GatewayError> {
        self.reserve(meter, Amount::default()).await?;
        meter.admitted = true;
        Ok(())
    }

    /// A request with a body, read once: returns the body to forward (with
    /// `stream_options.include_usage` added where `inject_stream_usage` asks for it).
    pub async fn body(&self, meter: &mut Meter, bytes: Bytes) -> Result<Bytes, GatewayError> {
        let Some(parsed) = request::parse(&bytes) else {
            if self.allowed().is_some() || self.budgeted() {
                return Err(GatewayError::BadRequest);
            }
            meter.admitted = true;
            return Ok(bytes);
        };
        let ins = &parsed.inspected;
        meter.model = ins.model.clone();
        if let Some(allowed) = self.allowed() {
            request::check_models(allowed, ins)?;
        }
        if self.budgeted() && ins.bad_limit.is_some() {
            return Err(GatewayError::BadRequest);
        }
        let own = self.estimate(
            ins.model.as_deref(),
            bytes.len(),
            ins.completion_limit,
            ins.choices,
        );
        self.reserve(meter, own).await?;
        meter.admitted = true;
        let inject = !self.anthropic
            && self
                .live
                .config
                .usage
                .as_ref()
                .is_some_and(|u| u.inject_stream_usage);
        if inject && let Some(rewritten) = parsed.inject_include_usage() {
            meter.injected = true;
            return Ok(Bytes::from(rewritten));
        }
        Ok(bytes)
    }

    /// SPEC §7 "Reservations": a prompt estimate of a token per four body bytes, plus the most
    /// completion tokens a choice may have (else `default_completion_reservation`) times the
    /// choices asked for (the prompt is billed once, each choice's completion separately), priced
    /// by the request's model or the fallback price.
    fn estimate(
        &self,
        model: Option<&str>,
        body_len: usize,
        completion_limit: Option<u64>,
        choices: u64,
    ) -> Amount {
        let usage = self.live.config.usage.as_ref();
        let prompt = body_len.div_ceil(4) as f64;
        let completion = completion_limit
            .unwrap_or(self.default_completion())
            .saturating_mul(choices) as f64;
        let cost = usage
            .and_then(|u| u.price(model, None))
            .map_or(0.0, |p| p.cost(prompt, completion));
        Amount {
            tokens: prompt + completion,
            cost,
        }
    }

    /// Admits a request that would reserve `own` against its key's and the gateway's caps (with
    /// budgets configured), or refuses it with 429 `budget_exceeded` (503 `overloaded` when
    /// budgets are shared, Redis does not answer and `cluster.on_error = "deny"`).
    async fn reserve(&self, meter: &mut Meter, own: Amount) -> Result<(), GatewayError> {
        let Some(book) = self.book else {
            return Ok(());
        };
        let (live, cfg) = (self.live, &self.live.config);
        let key = self.key_index.map(|k| &cfg.keys[k]);
        let user_caps = key.map_or_else(|| Arc::from([]), |k| k.user_budget.clone());
        let (subject, subject_caps) = match &self.subject {
            Some((id, caps)) => (Some(Arc::<str>::from(*id)), Some(caps.clone())),
            None => (None, None),
        };
        let applies = Applies {
            // A JWT subject is held like a key: its spend is kept under its identity.
            key: self.key_index.map(|k| live.key_ids[k].clone()).or(subject),
            // A user has an account only where there is a cap to hold them to.
            user: self.user.filter(|_| !user_caps.is_empty()).map(Arc::from),
            // Shared slices: a refcount each, no copy of the caps per request.
            key_caps: key
                .map(|k| k.budget.clone())
                .or(subject_caps)
                .unwrap_or_else(|| Arc::from([])),
            user_caps,
            gateway_caps: cfg.budgets.clone(),
        };
        let reservation: Reservation = book
            .reserve(applies, own, crate::clock::now_secs())
            .await
            .map_err(|r| match r {
            Refusal::Spent(retry_after) => GatewayError::BudgetExceeded { retry_after },
            Refusal::Unavailable => GatewayError::Overloaded,
        })?;
        meter.reservation = Some(reservation);
        Ok(())
    }
}
