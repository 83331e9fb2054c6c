{
 "algorithm": "Ed25519",
 "key_id": "5f517f13c7a93519",
 "manifest_sha256": "a74f91a5b258c9429c1d16aac45b6a2b363a29d289389543c52523b45bfc669c",
 "signed": "2026-12-08T04:31:04+00:00",
 "signature": "0TLwwi07HYvrtmIifjHfG9EP50ouzfUZnBKOQqcOHq/MzJsZnjwghl3ZDJ1kYuMFm/wyttwXTFMJ84uXUEZWBg=="
}
