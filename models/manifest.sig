{
 "algorithm": "Ed25519",
 "key_id": "3c1e67693ecaa33b",
 "manifest_sha256": "0dce3188479c6b5d77da313d52a35ff75d548d249b9a6dcbc09b00255176ccaa",
 "signed": "2026-11-23T16:35:04+00:00",
 "signature": "/Srmq14kfi47uibvp82r/WZIdGY/E0ay9mGjraEMHP0x6QWRjyriVoOj3XIWW2+UWZiFCBjXB2bgpLSyd217Aw=="
}
