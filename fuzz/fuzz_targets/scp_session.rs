//! The node's whole DICOM acceptor on one byte stream: each input is what a
//! peer sends on a fresh TCP connection to the real SCP (`dimse::server`:
//! admission and the ARTIM peek, dicom-ul's A-ASSOCIATE-RQ parse and the
//! node's negotiation and access policy, then P-DATA, commands and C-STORE
//! data through a sink that keeps nothing), closed by the peer after
//! sending. libfuzzer-sys aborts on a panic in any thread, so a panic in a
//! connection task is a crash here, not a JoinError.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use her2map::dimse::server::{
    AssociationInfo, AssociationStats, ConnectionLimits, DimseStatus, InstanceSink, Server,
    ServerConfig, StoreRequest, StoreService,
};
use libfuzzer_sys::fuzz_target;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Discard;

struct Nothing;

impl InstanceSink for Nothing {
    async fn write(&mut self, _bytes: Vec<u8>) -> Result<(), DimseStatus> {
        Ok(())
    }
    async fn finish(self) -> DimseStatus {
        DimseStatus::SUCCESS
    }
    async fn abort(self) {}
}

impl StoreService for Discard {
    type Sink = Nothing;
    async fn association_opened(&self, _info: &AssociationInfo) {}
    async fn association_rejected(&self, _p: SocketAddr, _a: &str, _b: &str, _r: &str) {}
    async fn association_closed(&self, _i: &AssociationInfo, _o: &str, _s: &AssociationStats) {}
    async fn begin(
        &self,
        _info: &AssociationInfo,
        _request: &StoreRequest,
    ) -> Result<Nothing, DimseStatus> {
        Ok(Nothing)
    }
}

/// The SCP, started once per fuzzing process on a loopback port, with the
/// node's defaults (AE title HER2MAP, max PDU 65536, any called AE refused).
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let config = ServerConfig {
                    ae_title: "HER2MAP".into(),
                    max_pdu: 65536,
                    max_associations: 16,
                    accept_any_storage: false,
                    accept_any_called_ae: false,
                    read_timeout: Duration::from_secs(2),
                    peers: Vec::new(),
                };
                let limits = ConnectionLimits {
                    artim_timeout: Duration::from_secs(2),
                    ..ConnectionLimits::default()
                };
                let server = Server::bind("127.0.0.1:0", config, Discard)
                    .await
                    .unwrap()
                    .connection_limits(limits);
                tx.send(server.local_addr().unwrap()).unwrap();
                server.run(CancellationToken::new()).await;
            });
        });
        rx.recv().unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let addr = server();
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let _ = stream.write_all(data);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Wait for the node to finish with this connection (it closes it).
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
});
