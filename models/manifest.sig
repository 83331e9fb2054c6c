{
 "algorithm": "Ed25519",
 "key_id": "3c1e67693ecaa33b",
 "manifest_sha256": "59c4f1e0bc51bea6f952559da77df252ac27912e7763e751d049fcfd622ecab7",
 "signed": "2026-11-23T15:15:11+00:00",
 "signature": "BvisyDLdKRoJRLH0Vm4M1v6GBxdW/SetMlajf/179i2JF7J9tvis0f7ADDM36+XOhaOSGhyjw+pLpInPuvPoAg=="
}
