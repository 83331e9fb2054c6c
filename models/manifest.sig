{
 "algorithm": "Ed25519",
 "key_id": "5f517f13c7a93519",
 "manifest_sha256": "ca150deda12633e4da3376f3386a229b791d239a781b2d0b453beae47d0748a8",
 "signed": "2026-12-08T01:11:50+00:00",
 "signature": "JpomQXRmT65I9cTZ6oUYK/ZxONn4anewktE3bb7pPjXVxZ1lr10/rkM7PSaFZJhv3Pu6RryOfuLuyoO7terVCQ=="
}
