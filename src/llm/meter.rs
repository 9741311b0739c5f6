//! Metering one `llm` request (SPEC §7 "Reservations", the charging table): what it asked for,
//! what it holds against the budgets, what its response reported, and — exactly once, when the
//! request's record is written — what it is charged.
//!
//! The charge depends on how far the exchange got, never on whether the client stayed to read
//! the answer: a request the upstream received is charged its usage, or its reservation when no
//! usage arrived (the client hung up, the route timed out, the stream was cut, the upstream
//! stopped reporting usage). Otherwise a key holder could spend without limit by hanging up
//! before each answer, which a real provider bills all the same.

use super::budget::{Amount, BudgetEvent, Reservation};
use super::usage::{LlmRecord, Price, Reading, Reported, UsageSlot};

/// How far the exchange with the upstream got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Refused by the gateway, or the upstream never received it (connect failed).
    NotSent,
    /// Handed to the upstream; no response head (yet).
    Sent,
    /// The upstream answered with this status.
    Answered(u16),
}

/// SPEC §7's charging table. `usage`: the reported usage as tokens and USD.
pub fn charge(exchange: Exchange, usage: Option<Amount>, reservation: Amount) -> Amount {
    match (exchange, usage) {
        (Exchange::NotSent, _) => Amount::default(),
        (_, Some(u)) => u,
        (Exchange::Answered(s), None) if !(200..300).contains(&s) => Amount::default(),
        (Exchange::Sent | Exchange::Answered(_), None) => reservation,
    }
}

/// One `llm` request's metering state.
pub struct Meter {
    /// The model the request asked for (the body's `model`, or a handshake's query parameter).
    pub model: Option<String>,
    /// Where the response's usage lands as it streams past.
    pub slot: UsageSlot,
    /// The gateway asked for `include_usage`: the usage-only event is not the client's.
    pub injected: bool,
    /// Held against the budgets until the request is settled; `None` without budgets.
    pub reservation: Option<Reservation>,
    /// Passed the allow-list and the budgets: the request gets a ledger row (refusals do not,
    /// so `portcullis usage` counts the requests that were let through).
    pub admitted: bool,
}

/// What settling a request produced: its record's `llm` fields, its charge, and the `budget`
/// events the charge caused.
pub struct Settled {
    pub admitted: bool,
    pub record: LlmRecord,
    pub charged: Amount,
    pub events: Vec<BudgetEvent>,
}

impl Meter {
    pub fn new(model: Option<String>) -> Meter {
        Meter {
            model,
            slot: UsageSlot::default(),
            injected: false,
            reservation: None,
            admitted: false,
        }
    }

    /// Charges the request by the table and releases its reservation. `price`: how to price
    /// it given the response's model (see `UsageSettings::price`).
    pub fn settle(
        self,
        exchange: Exchange,
        price: impl FnOnce(Option<&str>, Option<&str>) -> Option<Price>,
    ) -> Settled {
        let reported = match self.slot.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        };
        // A response's usage is only read once it answered (a tap sits on answered bodies).
        let reported = match exchange {
            Exchange::Answered(_) => reported,
            _ => Reported::default(),
        };
        let price = price(self.model.as_deref(), reported.model.as_deref());
        let record = LlmRecord::new(self.model, reported.reading, price);
        let usage = match reported.reading {
            Reading::Valid(u) => Some(Amount {
                tokens: u.tokens() as f64,
                cost: record.cost_usd.unwrap_or(0.0),
            }),
            _ => None,
        };
        let reservation = self.reservation.as_ref().map(|r| r.amount());
        let charged = charge(exchange, usage, reservation.unwrap_or_default());
        let events = match self.reservation {
            Some(r) => r.settle(charged, crate::clock::now_secs()),
            None => Vec::new(),
        };
        Settled {
            admitted: self.admitted,
            record,
            charged,
            events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_charging_table() {
        let res = Amount {
            tokens: 1000.0,
            cost: 0.01,
        };
        let used = Amount {
            tokens: 16.0,
            cost: 0.0001,
        };
        let none = Amount::default();
        for (exchange, usage, want) in [
            // Refused by the gateway, or never received by the upstream: nothing.
            (Exchange::NotSent, None, none),
            (Exchange::NotSent, Some(used), none),
            // The upstream answered non-2xx: its usage if reported, else nothing.
            (Exchange::Answered(429), None, none),
            (Exchange::Answered(500), Some(used), used),
            // 2xx with usage: the usage; without: the reservation.
            (Exchange::Answered(200), Some(used), used),
            (Exchange::Answered(200), None, res),
            // Sent and then abandoned, timed out or cut before an answer: the reservation.
            (Exchange::Sent, None, res),
        ] {
            assert_eq!(charge(exchange, usage, res), want, "{exchange:?} {usage:?}");
        }
    }
}
