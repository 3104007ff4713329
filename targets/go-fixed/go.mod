module afterclose.example/goepoll

go 1.19
