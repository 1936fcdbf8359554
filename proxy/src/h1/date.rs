//! The `date` header of responses that lack one, formatted once per second per thread.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

struct Cached {
    second: u64,
    text: [u8; 29],
}

thread_local! {
    static DATE: RefCell<Cached> = const { RefCell::new(Cached { second: u64::MAX, text: [0; 29] }) };
}

/// Calls `f` with the current IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn with_now<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.second != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == d.text.len() {
                d.text.copy_from_slice(text.as_bytes());
                d.second = second;
            }
        }
        f(&d.text)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_an_imf_fixdate() {
        let text = super::with_now(|d| String::from_utf8(d.to_vec()).unwrap());
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
