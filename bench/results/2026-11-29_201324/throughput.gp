set terminal png size 1400,900 font ',11'
set output 'throughput.png'
set datafile missing '?'
set multiplot layout 2,2 title 'WireGuard gateway throughput by packet size (inner frame bytes)'
set key top left
set grid ytics
set yrange [0:*]
set style data linespoints
set title 'encrypt (LAN to tunnel)'
set ylabel 'Mpps'
plot 'enc_mpps.dat' using 2:xtic(1) title 'subway' lw 2 pt 7, 'enc_mpps.dat' using 3:xtic(1) title 'boringtun-cli' lw 2 pt 7, 'enc_mpps.dat' using 4:xtic(1) title 'wireguard-go' lw 2 pt 7
set title 'decrypt (tunnel to LAN)'
set ylabel 'Mpps'
plot 'dec_mpps.dat' using 2:xtic(1) title 'subway' lw 2 pt 7, 'dec_mpps.dat' using 3:xtic(1) title 'boringtun-cli' lw 2 pt 7, 'dec_mpps.dat' using 4:xtic(1) title 'wireguard-go' lw 2 pt 7
set title 'encrypt'
set ylabel 'Gbit/s'
plot 'enc_gbps.dat' using 2:xtic(1) title 'subway' lw 2 pt 7, 'enc_gbps.dat' using 3:xtic(1) title 'boringtun-cli' lw 2 pt 7, 'enc_gbps.dat' using 4:xtic(1) title 'wireguard-go' lw 2 pt 7
set title 'decrypt'
set ylabel 'Gbit/s'
plot 'dec_gbps.dat' using 2:xtic(1) title 'subway' lw 2 pt 7, 'dec_gbps.dat' using 3:xtic(1) title 'boringtun-cli' lw 2 pt 7, 'dec_gbps.dat' using 4:xtic(1) title 'wireguard-go' lw 2 pt 7
unset multiplot
