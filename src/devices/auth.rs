//! Device authentication (DESIGN.md §7), protocol-neutral: the MQTT front hands over what a
//! CONNECT carried and answers with the CONNACK code of the outcome.
//!
//! Two modes, told apart by the client id:
//! * **signed**: client id `{device_id}_0_{signType}_{YYYYMMDDHH}`, username `{device_id}`,
//!   password = lowercase hex of HMAC-SHA256 keyed by the `YYYYMMDDHH` string (UTC) over the
//!   device secret. signType 0: the timestamp is not checked; 1: it must be within ±1 h of
//!   this node's clock.
//! * **plain**: client id = username = `{device_id}`, password = the secret.
//!
//! Passwords are compared in constant time. A refusal says why, for the `auth_failed`
//! notification and the log, but the client only learns the CONNACK code.

use chrono::{NaiveDateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::records::{DeviceRecord, Status};

/// How far a signed client id's timestamp may be from this node's clock with signType 1.
pub const MAX_SKEW_SECS: i64 = 3600;

/// What a CONNECT said about who it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

/// Without the password.
impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .finish()
    }
}

/// The identity a client id claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<'a> {
    pub device_id: &'a str,
    pub mode: Mode<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode<'a> {
    Plain,
    /// `check_time`: signType 1.
    Signed {
        timestamp: &'a str,
        check_time: bool,
    },
}

/// Why a device was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The client id is neither form (or its signType is not 0 or 1).
    MalformedClientId(String),
    UnknownDevice,
    /// No username, a username other than the device id, no password, or a wrong one.
    BadCredentials(String),
    /// signType 1 and the timestamp is more than an hour away (or not a time).
    StaleTimestamp(String),
    Disabled,
}

impl Refusal {
    /// The reason in `auth_failed` notifications.
    pub fn reason(&self) -> String {
        match self {
            Refusal::MalformedClientId(why) => format!("malformed client id: {why}"),
            Refusal::UnknownDevice => "unknown device".to_string(),
            Refusal::BadCredentials(why) => format!("bad credentials: {why}"),
            Refusal::StaleTimestamp(why) => format!("stale timestamp: {why}"),
            Refusal::Disabled => "device disabled".to_string(),
        }
    }

    /// The MQTT 3.1.1 CONNACK return code: 2 identifier rejected, 4 bad user name or
    /// password, 5 not authorized.
    pub fn v4_code(&self) -> u8 {
        match self {
            Refusal::MalformedClientId(_) | Refusal::UnknownDevice => 2,
            Refusal::BadCredentials(_) => 4,
            Refusal::StaleTimestamp(_) | Refusal::Disabled => 5,
        }
    }

    /// The MQTT 5 CONNACK reason code: 0x85 client identifier not valid, 0x86 bad user name
    /// or password, 0x87 not authorized, 0x8A banned.
    pub fn v5_code(&self) -> u8 {
        match self {
            Refusal::MalformedClientId(_) | Refusal::UnknownDevice => 0x85,
            Refusal::BadCredentials(_) => 0x86,
            Refusal::StaleTimestamp(_) => 0x87,
            Refusal::Disabled => 0x8A,
        }
    }
}

/// The device a client id names, and how it signs. A client id with exactly three `_`
/// separated fields after the device id in the signed form is signed; anything else is a
/// plain device id.
pub fn claim(client_id: &str) -> Result<Claim<'_>, Refusal> {
    let mut parts = client_id.rsplitn(4, '_');
    let (ts, sign, kind, device) = (parts.next(), parts.next(), parts.next(), parts.next());
    if let (Some(ts), Some(sign), Some("0"), Some(device)) = (ts, sign, kind, device)
        && ts.len() == 10
        && ts.bytes().all(|b| b.is_ascii_digit())
    {
        let check_time = match sign {
            "0" => false,
            "1" => true,
            other => {
                return Err(Refusal::MalformedClientId(format!(
                    "signType {other:?} is not 0 or 1"
                )));
            }
        };
        return Ok(Claim {
            device_id: device,
            mode: Mode::Signed {
                timestamp: ts,
                check_time,
            },
        });
    }
    if client_id.is_empty() {
        return Err(Refusal::MalformedClientId("empty client id".into()));
    }
    Ok(Claim {
        device_id: client_id,
        mode: Mode::Plain,
    })
}

/// The signed-mode password of `secret` at `timestamp` (`YYYYMMDDHH`).
pub fn sign(timestamp: &str, secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(timestamp.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(secret.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `YYYYMMDDHH` as seconds since the epoch (UTC), if it is a time.
fn timestamp_secs(ts: &str) -> Option<i64> {
    let t = NaiveDateTime::parse_from_str(&format!("{ts}0000"), "%Y%m%d%H%M%S").ok()?;
    Some(Utc.from_utc_datetime(&t).timestamp())
}

fn same(a: &[u8], b: &[u8]) -> bool {
    // Constant time in the contents (the lengths are not secret: hex of a SHA-256 or the
    // secret's length, which the device chose).
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Authenticates `creds` against the registry: `lookup(device_id)` finds the device; `now`
/// is this node's clock in seconds since the epoch. Returns the device on success.
pub fn authenticate(
    creds: &Credentials<'_>,
    now: i64,
    lookup: impl FnOnce(&str) -> Option<DeviceRecord>,
) -> Result<DeviceRecord, Refusal> {
    let claim = claim(creds.client_id)?;
    let device = lookup(claim.device_id).ok_or(Refusal::UnknownDevice)?;
    match creds.username {
        Some(u) if u == claim.device_id => {}
        Some(u) => {
            return Err(Refusal::BadCredentials(format!(
                "username {u:?} is not the device id {:?}",
                claim.device_id
            )));
        }
        None => return Err(Refusal::BadCredentials("no username".into())),
    }
    let Some(password) = creds.password else {
        return Err(Refusal::BadCredentials("no password".into()));
    };
    let expected = match claim.mode {
        Mode::Plain => device.secret.clone(),
        Mode::Signed {
            timestamp,
            check_time,
        } => {
            if check_time {
                let Some(at) = timestamp_secs(timestamp) else {
                    return Err(Refusal::StaleTimestamp(format!(
                        "{timestamp} is not a time (YYYYMMDDHH)"
                    )));
                };
                // The timestamp names an hour: anywhere in it counts.
                let off = if now < at {
                    at - now
                } else {
                    (now - at - 3599).max(0)
                };
                if off > MAX_SKEW_SECS {
                    return Err(Refusal::StaleTimestamp(format!(
                        "{timestamp} is {off} s away from this node's clock (at most \
                         {MAX_SKEW_SECS})"
                    )));
                }
            }
            sign(timestamp, &device.secret)
        }
    };
    if !same(password, expected.as_bytes()) {
        return Err(Refusal::BadCredentials("wrong password".into()));
    }
    if device.status == Status::Disabled {
        return Err(Refusal::Disabled);
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn device(status: Status) -> DeviceRecord {
        DeviceRecord {
            device_id: "dev_1".into(),
            product: "thermo".into(),
            application: "default".into(),
            secret: "s3cret-pass".into(),
            status,
            tags: BTreeMap::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            version: 1,
        }
    }

    /// 2026-11-28T03:00:00Z.
    const HOUR: i64 = 1_795_834_800;

    fn auth(client_id: &str, user: &str, password: &str, now: i64) -> Result<(), Refusal> {
        auth_with(client_id, user, password, now, Status::Enabled)
    }

    fn auth_with(
        client_id: &str,
        user: &str,
        password: &str,
        now: i64,
        status: Status,
    ) -> Result<(), Refusal> {
        let creds = Credentials {
            client_id,
            username: Some(user),
            password: Some(password.as_bytes()),
        };
        authenticate(&creds, now, |id| (id == "dev_1").then(|| device(status))).map(|_| ())
    }

    #[test]
    fn client_ids_are_read_from_the_right() {
        let c = claim("dev_1_0_1_2026112803").expect("signed");
        assert_eq!(c.device_id, "dev_1");
        assert_eq!(
            c.mode,
            Mode::Signed {
                timestamp: "2026112803",
                check_time: true
            }
        );
        assert_eq!(claim("dev_1").expect("plain").mode, Mode::Plain);
        // Not the signed shape: a plain id that happens to contain underscores.
        assert_eq!(claim("a_b_c").expect("plain").device_id, "a_b_c");
        assert!(matches!(
            claim("dev_1_0_7_2026112803"),
            Err(Refusal::MalformedClientId(_))
        ));
        assert_eq!(timestamp_secs("2026112803"), Some(HOUR));
    }

    #[test]
    fn signed_and_plain_devices_authenticate() {
        let ts = "2026112803";
        let password = sign(ts, "s3cret-pass");
        assert_eq!(password.len(), 64);
        let id = format!("dev_1_0_1_{ts}");
        assert_eq!(auth(&id, "dev_1", &password, HOUR + 1800), Ok(()));
        assert_eq!(auth("dev_1", "dev_1", "s3cret-pass", HOUR), Ok(()));
        // signType 0: any time.
        let unchecked = format!("dev_1_0_0_{ts}");
        assert_eq!(
            auth(&unchecked, "dev_1", &password, HOUR + 86_400 * 30),
            Ok(())
        );
    }

    #[test]
    fn every_refusal_has_its_reason_and_code() {
        let ts = "2026112803";
        let password = sign(ts, "s3cret-pass");
        let id = format!("dev_1_0_1_{ts}");
        let unknown = auth("nobody", "nobody", "x", HOUR).expect_err("unknown");
        assert_eq!(unknown, Refusal::UnknownDevice);
        assert_eq!((unknown.v4_code(), unknown.v5_code()), (2, 0x85));
        let wrong = auth("dev_1", "dev_1", "s3cret-pasS", HOUR).expect_err("wrong");
        assert!(matches!(wrong, Refusal::BadCredentials(_)));
        assert_eq!((wrong.v4_code(), wrong.v5_code()), (4, 0x86));
        let user = auth("dev_1", "dev_2", "s3cret-pass", HOUR).expect_err("user");
        assert!(matches!(user, Refusal::BadCredentials(_)));
        // Two hours early or late is stale; within the hour and an hour either side is not.
        for now in [HOUR - 2 * 3600 - 1, HOUR + 3 * 3600] {
            let stale = auth(&id, "dev_1", &password, now).expect_err("stale");
            assert!(matches!(stale, Refusal::StaleTimestamp(_)), "{stale:?}");
            assert_eq!((stale.v4_code(), stale.v5_code()), (5, 0x87));
        }
        assert_eq!(auth(&id, "dev_1", &password, HOUR - 3600), Ok(()));
        assert_eq!(auth(&id, "dev_1", &password, HOUR + 2 * 3600 - 1), Ok(()));
        // A password signed for another hour does not match this client id's.
        let other = sign("2026112804", "s3cret-pass");
        assert!(matches!(
            auth(&id, "dev_1", &other, HOUR),
            Err(Refusal::BadCredentials(_))
        ));
        let disabled =
            auth_with("dev_1", "dev_1", "s3cret-pass", HOUR, Status::Disabled).expect_err("off");
        assert_eq!(disabled, Refusal::Disabled);
        assert_eq!((disabled.v4_code(), disabled.v5_code()), (5, 0x8A));
        // A disabled device with a wrong password learns only that the password is wrong.
        assert!(matches!(
            auth_with("dev_1", "dev_1", "nope-nope", HOUR, Status::Disabled),
            Err(Refusal::BadCredentials(_))
        ));
    }
}
