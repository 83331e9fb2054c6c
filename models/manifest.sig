{
 "algorithm": "Ed25519",
 "key_id": "5f517f13c7a93519",
 "manifest_sha256": "59074fae766afcbc6816a14bfd9a76f173c0c7705eed53212f8fbc44945657ce",
 "signed": "2026-12-08T02:49:19+00:00",
 "signature": "Ypk8TFlPSgKmKzqPdkcjdxMpjXNN3dRdziPr9dztam/tDQbdkakY3/JxYnheZlSqCHaffQ+Nca7WtcFbVHd5Dw=="
}
