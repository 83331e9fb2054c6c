{
 "algorithm": "Ed25519",
 "key_id": "c2e6c01e4e9a8359",
 "manifest_sha256": "72da18813d05fa857392660e5373d3b5433e4814fe4b9695f8f522e4e5c5fd24",
 "signed": "2026-12-07T16:31:57+00:00",
 "signature": "c+agOmZ23mSHqE4XeZL/PnEQ0QjJa7V7Y0IENJ+P7VU+NioTLROFOw5zZxv6yS39dIfy4BuYIQrFSRe3dWfcCQ=="
}
