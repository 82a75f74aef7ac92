//! The value syntaxes shared by the sections: keys, booleans, numbers,
//! comma lists, ranges, prefixes and VNET names.

use super::{ConfigError, Key32};
use base64::Engine;
use ipnet::IpNet;

pub(super) type ErrFn<'a> = dyn Fn(usize, String) -> ConfigError + 'a;

pub(super) fn parse_key(v: &str, what: &str, line: usize, err: &ErrFn) -> Result<Key32, ConfigError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v).map_err(|_| {
        err(
            line,
            format!("{what} is not valid base64: paste the key as `wg genkey` / `wg pubkey` print it"),
        )
    })?;
    let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        err(
            line,
            format!(
                "{what} decodes to {} bytes, a WireGuard key has 32: paste the whole key",
                b.len()
            ),
        )
    })?;
    Ok(Key32(arr))
}

pub(super) fn parse_bool(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(err(line, format!("{k} = {v}: use true or false"))),
    }
}

pub(super) fn parse_num<T: std::str::FromStr>(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<T, ConfigError> {
    v.parse()
        .map_err(|_| err(line, format!("{k} = {v}: expected a number")))
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// "0,2,4-7" -> [0,2,4,5,6,7]
pub(super) fn parse_ranges(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<Vec<u32>, ConfigError> {
    let mut out = Vec::new();
    for item in list(v) {
        if let Some((a, b)) = item.split_once('-') {
            let (a, b): (u32, u32) = (parse_num(k, a.trim(), line, err)?, parse_num(k, b.trim(), line, err)?);
            if a > b || b - a > 1024 {
                return Err(err(line, format!("{k} = {v}: range {item} is backwards or too long")));
            }
            out.extend(a..=b);
        } else {
            out.push(parse_num(k, item, line, err)?);
        }
    }
    if out.is_empty() {
        return Err(err(
            line,
            format!("{k} is empty: list numbers like 0,1 or a range like 0-3"),
        ));
    }
    Ok(out)
}

pub(super) fn parse_prefixes(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<Vec<IpNet>, ConfigError> {
    list(v)
        .map(|s| {
            prefix(s)
                .ok_or(())
                .or_else(|_| s.parse::<IpNet>())
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    err(
                        line,
                        format!("{k}: `{s}` is not a prefix like 10.0.0.0/24 or fd00::/64"),
                    )
                })
        })
        .collect()
}

/// `ADDRESS/LEN` or `ADDRESS` the quick way (std's address parser and a
/// plain number; ipnet's general parser is several times slower, which
/// shows with 100,000 AllowedIPs). None for anything else: the caller
/// falls back to ipnet, which decides and words the error.
fn prefix(s: &str) -> Option<IpNet> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: std::net::IpAddr = a.parse().ok()?;
    let len = match len {
        None => {
            if addr.is_ipv4() {
                32
            } else {
                128
            }
        }
        // At most 2 digits for IPv4 and 3 for IPv6, as ipnet reads them.
        Some(l)
            if (1..=if addr.is_ipv4() { 2 } else { 3 }).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_digit()) =>
        {
            l.parse().ok()?
        }
        Some(_) => return None,
    };
    IpNet::new(addr, len).ok()
}

pub(super) fn vnet_name(v: &str, line: usize, err: &ErrFn) -> Result<String, ConfigError> {
    if v.is_empty() || v.len() > 32 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
        return Err(err(
            line,
            format!("VNet `{v}`: use up to 32 letters, digits, '-' or '_'"),
        ));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_prefix_parser_agrees_with_ipnet_and_leaves_the_rest_to_it() {
        for s in [
            "10.1.0.0/24",
            "10.1.0.7/24",
            "0.0.0.0/0",
            "10.9.9.9",
            "fd00::/64",
            "fd00::1",
            "::/0",
            "1.2.3.4/32",
        ] {
            let want = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .unwrap();
            assert_eq!(prefix(s), Some(want), "{s}");
        }
        for s in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/0008",
            "x/8",
            "10.0.0/8",
            "",
        ] {
            assert_eq!(prefix(s), None, "{s}");
        }
        // Never accepts what ipnet refuses (the fallback decides those).
        for s in [
            "10.0.0.0/008",
            "10.0.0.0/024",
            "10.0.0.0/08",
            "fd00::/064",
            "fd00::/0064",
            "010.0.0.0/8",
        ] {
            if let Some(p) = prefix(s) {
                assert_eq!(s.parse::<IpNet>().ok(), Some(p), "{s}");
            }
        }
    }
}
