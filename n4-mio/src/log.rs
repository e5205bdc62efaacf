//! Log lines shaped like the original's: `[2024-06-01 12:38:56,438] INFO  <= Hello `.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The original's line layout: local time with milliseconds, level, message. No target, no
/// spans, no colours: the lines are for people and for `grep`.
struct V1Format;

impl<S, N> FormatEvent<S, N> for V1Format
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S,%3f");
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        write!(writer, "[{now}] {level} ")?;
        // Fields may hold bytes from the network (an identifier): one event is one line, so
        // control bytes are escaped, never written raw (no forged or split lines).
        let mut fields = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut fields), event)?;
        writer.write_str(&escape_controls(&fields))?;
        writeln!(writer)
    }
}

/// `text` with every control character (CR, LF, ESC, DEL, …) written as an escape (`\r`,
/// `\n`, `\u{1b}`), so that it stays on one line and cannot steer a terminal.
pub(crate) fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// Sends `tracing` output to stderr in the original's format. `RUST_LOG` overrides `default`
/// (e.g. `info`, `debug`, `n4_mio=trace`).
pub fn init_logging(default: Level) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default.as_str().to_ascii_lowercase()));
    // A second init (tests calling twice) is harmless: keep the first.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .event_format(V1Format)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_bytes_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("Paired [ab] ok"), "Paired [ab] ok");
        assert_eq!(escape_controls("a\r\nINFO forged"), "a\\r\\nINFO forged");
        assert_eq!(escape_controls("\u{1b}[2J\u{7f}\t"), "\\u{1b}[2J\\u{7f}\\t");
    }
}
