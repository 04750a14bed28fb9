//! SSE answers of an MCP server, passed on event by event as they arrive: each event's `data`
//! is filtered (`tools/list` results) and scrubbed of upstream secrets before the agent sees
//! it. Events are cut at blank lines, so a secret split across network chunks is still found.

use std::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::{BodyDataStream, BodyExt};
use hyper::body::Incoming;
use serde_json::Value;

use super::MAX_RESPONSE_BYTES;
use super::tools::ToolsFilter;
use crate::outcome::{CallOutcome, Ending};
use crate::scrub::JsonScrubber;

/// The agent's view of an upstream event stream, led by the JSON-RPC errors of the messages
/// remit refused itself. `outcome` (with the upstream's status and when the request was
/// forwarded) is recorded when the stream ends, with the bytes the agent was sent.
pub(super) fn filter(
    body: Incoming,
    tools: ToolsFilter,
    scrubber: JsonScrubber,
    errors: Vec<Value>,
    outcome: (CallOutcome, u16, Instant),
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let mut lead = String::new();
    for error in errors {
        lead.push_str("data: ");
        lead.push_str(&error.to_string());
        lead.push_str("\n\n");
    }
    let state = State {
        body: body.into_data_stream(),
        parser: Parser::new(tools, scrubber),
        lead: (!lead.is_empty()).then(|| Bytes::from(lead)),
        outcome: Some(outcome),
        sent: 0,
        complete: false,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if let Some(lead) = state.lead.take() {
            state.count(&lead);
            return Some((Ok(lead), state));
        }
        while !state.done {
            match state.body.next().await {
                Some(Ok(chunk)) => match state.parser.feed(&chunk) {
                    Ok(out) if out.is_empty() => {}
                    Ok(out) => {
                        let out = Bytes::from(out);
                        state.count(&out);
                        return Some((Ok(out), state));
                    }
                    Err(error) => {
                        state.done = true;
                        return Some((Err(error), state));
                    }
                },
                // The upstream broke off: so does the agent's stream, rather than end as if
                // complete.
                Some(Err(error)) => {
                    state.done = true;
                    return Some((Err(std::io::Error::other(error)), state));
                }
                None => {
                    state.done = true;
                    state.complete = true;
                }
            }
        }
        None
    })
}

struct State {
    body: BodyDataStream<Incoming>,
    parser: Parser,
    lead: Option<Bytes>,
    outcome: Option<(CallOutcome, u16, Instant)>,
    /// Bytes handed to the agent so far.
    sent: u64,
    /// The upstream's stream ended normally (not broken off, not cut by the agent leaving).
    complete: bool,
    done: bool,
}

impl State {
    fn count(&mut self, bytes: &Bytes) {
        self.sent = self
            .sent
            .saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    }
}

impl Drop for State {
    /// The stream ended, or the agent went away: either way the outcome is recorded once.
    fn drop(&mut self) {
        if let Some((outcome, status, started)) = self.outcome.take() {
            outcome.finish(Ending {
                status,
                bytes: self.sent,
                complete: self.complete,
                upstream_reached: true,
                took: started.elapsed(),
            });
        }
    }
}

/// Splits a byte stream into SSE lines and events.
#[derive(Debug)]
pub(super) struct Parser {
    tools: ToolsFilter,
    scrubber: JsonScrubber,
    /// Bytes of a line not yet complete.
    pending: Vec<u8>,
    /// Lines of the event not yet complete.
    event: Vec<String>,
    event_bytes: usize,
}

impl Parser {
    pub(super) fn new(tools: ToolsFilter, scrubber: JsonScrubber) -> Parser {
        Parser {
            tools,
            scrubber,
            pending: Vec::new(),
            event: Vec::new(),
            event_bytes: 0,
        }
    }

    /// Takes one chunk; returns the complete events it finished, rewritten.
    pub(super) fn feed(&mut self, chunk: &[u8]) -> Result<Vec<u8>, std::io::Error> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(end) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let mut line = &self.pending[start..start + end];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let line = String::from_utf8_lossy(line).into_owned();
            start += end + 1;
            if line.is_empty() {
                self.finish_event(&mut out);
            } else {
                self.event_bytes += line.len();
                self.event.push(line);
            }
        }
        self.pending.drain(..start);
        if self.pending.len() + self.event_bytes > MAX_RESPONSE_BYTES {
            return Err(std::io::Error::other(
                "an event of the MCP server's stream is too large",
            ));
        }
        Ok(out)
    }

    fn finish_event(&mut self, out: &mut Vec<u8>) {
        let lines = std::mem::take(&mut self.event);
        self.event_bytes = 0;
        if lines.is_empty() {
            out.push(b'\n');
            return;
        }
        let data: Vec<&str> = lines
            .iter()
            .filter_map(|line| {
                line.strip_prefix("data:")
                    .map(|data| data.strip_prefix(' ').unwrap_or(data))
            })
            .collect();
        // A JSON message on one line that needs nothing passes as it came; any other JSON
        // message is rewritten whole (filtered, scrubbed after unescaping); anything else is
        // scrubbed line by line.
        let message = match data.as_slice() {
            [] => None,
            [only] if self.scrubber.passes_unchanged(only.as_bytes()) => Some((*only).to_string()),
            _ => serde_json::from_str::<Value>(&data.join("\n"))
                .ok()
                .map(|mut value| {
                    self.tools.apply(&mut value);
                    self.scrubber.value(&mut value);
                    value.to_string()
                }),
        };
        let mut data_written = false;
        for line in &lines {
            match (&message, line.starts_with("data:")) {
                (Some(_), true) if data_written => {}
                (Some(message), true) => {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(message.as_bytes());
                    out.push(b'\n');
                    data_written = true;
                }
                _ => {
                    out.extend_from_slice(self.scrubber.text(line).as_bytes());
                    out.push(b'\n');
                }
            }
        }
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(secrets: &[&str], allowed: &[&str], chunks: &[&str]) -> String {
        // Every spelling of each secret, as the gateway's upstream client derives them.
        let needles = std::sync::Arc::new(crate::scrub::Needles::new(secrets));
        let scrubber = JsonScrubber::new(&needles);
        let tools = ToolsFilter::for_test(allowed);
        let mut parser = Parser::new(tools, scrubber);
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(parser.feed(chunk.as_bytes()).unwrap());
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_secret_split_across_chunks_is_scrubbed() {
        let out = check(
            &["Bearer sk-upstream"],
            &[],
            &[
                "id: 1\ndata: {\"text\":\"key sk-up",
                "stream here\"}\n",
                "\n",
            ],
        );
        assert_eq!(out, "id: 1\ndata: {\"text\":\"key [redacted] here\"}\n\n");
    }

    #[test]
    fn tools_list_results_are_filtered_inside_events() {
        let event = r#"data: {"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"read_file"},{"name":"delete_all"}]}}"#;
        let out = check(&[], &["read_file"], &[event, "\r\n\r\n"]);
        assert_eq!(
            out,
            "data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"read_file\"}]}}\n\n"
        );
    }

    #[test]
    fn incomplete_events_wait_and_comments_pass() {
        let out = check(
            &[],
            &[],
            &[": keep-alive\n\nevent: message\ndata: not json"],
        );
        assert_eq!(out, ": keep-alive\n\n");
    }

    #[test]
    fn a_message_that_needs_nothing_passes_as_it_came() {
        // Spacing the careful path would not keep: this event was not parsed into a tree.
        let event = "data: {\"jsonrpc\": \"2.0\", \"id\": 3, \"result\": {\"text\": \"a \\\"quoted\\\" line\\n\"}}\n\n";
        assert_eq!(check(&["sk-upstream"], &[], &[event]), event);
    }

    #[test]
    fn an_escaped_secret_is_scrubbed_after_unescaping() {
        let out = check(
            &["sk-upstream"],
            &[],
            &["data: {\"text\":\"\\u0073k-upstream\"}\n\n"],
        );
        assert_eq!(out, "data: {\"text\":\"[redacted]\"}\n\n");
    }
}
