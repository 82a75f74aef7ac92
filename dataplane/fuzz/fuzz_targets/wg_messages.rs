//! WireGuard messages as the control thread meets them: classification
//! and the device's receive path (mac1 gate, Noise, data).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use subway_dataplane::wg::Now;
use subway_dataplane::wg::device::Device;
use subway_dataplane::wg::messages::Message;
use subway_dataplane::wg::peer::PeerConfig;

fuzz_target!(|data: &[u8]| {
    let _ = Message::parse(data);
    let mut dev = Device::new([0x41; 32]);
    let _ = dev.add_peer(&PeerConfig {
        public_key: Device::new([0x42; 32]).public,
        preshared_key: None,
        endpoint: None,
        allowed_ips: vec!["10.2.0.0/24".parse().unwrap()],
        persistent_keepalive: None,
        vnet: 0,
    });
    let now = Now {
        mono: Duration::from_secs(100),
        unix: Duration::from_secs(1_750_000_000),
    };
    let mut m = data.to_vec();
    let _ = dev.receive("192.0.2.2:51820".parse().unwrap(), &mut m, now);
});
